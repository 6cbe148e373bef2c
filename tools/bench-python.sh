#!/usr/bin/env bash
# usage: QUBESADMIN_SRC=DIR [QUBES_CORE_ADMIN_SRC=DIR QUBES_CORE_QREXEC_SRC=DIR] \
#          tools/bench-python.sh [pybench.py flags: --clients 8 --duration 3 --rounds 3]
#
# Issue #17's comparison with the Python client the dom0 tools use, in one run: starts
# qubesbus (`qubesbus run`, default settings, in-process NATS) over the 1009-qube fixture
# (testdata/qubes-1000.xml: the 9 qubes of testdata/qubes.xml and 1000 generated ones),
# the recorded floor (`qubesbus bench --serve-floor`: qubesbus's answers to the reads,
# from a table, through the gateway's socket handling) and, when the oracle's sources are
# given, the real qubesd on its simulated hypervisor (../shared/oracle) over the same
# fixture; runs tools/pybench.py against the three; stops them.
#
# env: QUBESBUS_BIN (default bin/qubesbus), PYBENCH_QUBES_XML (default
# testdata/qubes-1000.xml), ORACLE_DIR (default ../shared/oracle), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${QUBESBUS_BIN:-bin/qubesbus}")
xml=$(realpath "${PYBENCH_QUBES_XML:-testdata/qubes-1000.xml}")
oracle=${ORACLE_DIR:-../shared/oracle}
: "${QUBESADMIN_SRC:?set QUBESADMIN_SRC to an unpacked qubes-core-admin-client tree}"

dir=$(mktemp -d /tmp/qubesbus-pybench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
	rm -rf "$dir"
}
trap cleanup EXIT

# waits up to $3 s for the command $2 to succeed while process $1 lives
await() {
	local pid=$1 what=$2 tries=$(($3 * 10))
	for ((i = 0; i < tries; i++)); do
		if eval "$what"; then return 0; fi
		if ! kill -0 "$pid" 2>/dev/null; then echo "bench-python: process $pid exited; its log:" >&2; return 1; fi
		sleep 0.1
	done
	echo "bench-python: not ready in $3 s: $what" >&2
	return 1
}

"$bin" run --socket "$dir/qubesbus.sock" --data-dir "$dir/data" --qubes-xml "$xml" 2>"$dir/qubesbus.log" &
pids+=($!)
await "${pids[-1]}" '"$bin" query --socket "$dir/qubesbus.sock" -e admin.vm.List dom0 >/dev/null 2>&1' 120 || { tail "$dir/qubesbus.log" >&2; exit 1; }
targets=("qubesbus=$dir/qubesbus.sock")

"$bin" bench --serve-floor "$dir/floor.sock" --floor-from "$dir/qubesbus.sock" 2>"$dir/floor.log" &
pids+=($!)
await "${pids[-1]}" '[ -S "$dir/floor.sock" ]' 120 || { tail "$dir/floor.log" >&2; exit 1; }

if [ -n "${QUBES_CORE_ADMIN_SRC:-}" ] && [ -n "${QUBES_CORE_QREXEC_SRC:-}" ]; then
	# A base dir of its own (the oracle wipes it), which the fixture's pools name.
	sed "s#/var/lib/qubes#$dir/qbase#g" "$xml" >"$dir/oracle.xml"
	# run_qubesd.py itself rather than start-oracle.sh, whose 60 s wait for the socket a
	# busy 2-core machine overran with 1009 qubes; the entry points as that script makes them.
	py=${ORACLE_PYTHON:-/usr/bin/python3}
	if [ ! -f "$QUBES_CORE_ADMIN_SRC/qubes.egg-info/entry_points.txt" ]; then
		(cd "$QUBES_CORE_ADMIN_SRC" && "$py" setup.py egg_info >/dev/null 2>&1) || { echo "bench-python: egg_info failed" >&2; exit 1; }
	fi
	setsid "$py" "$oracle/run_qubesd.py" --socket "$dir/qubesd.sock" --qubes-xml "$dir/oracle.xml" \
		--base-dir "$dir/qbase" >"$dir/qubesd.log" 2>&1 </dev/null &
	pids+=($!)
	await "${pids[-1]}" '[ -S "$dir/qubesd.sock" ]' 600 || { tail "$dir/qubesd.log" >&2; exit 1; }
	targets+=("qubesd=$dir/qubesd.sock")
else
	echo "bench-python: no QUBES_CORE_ADMIN_SRC and QUBES_CORE_QREXEC_SRC: without the real qubesd" >&2
fi

"${PYTHON:-python3}" tools/pybench.py --floor "$dir/floor.sock" "$@" "${targets[@]}"
