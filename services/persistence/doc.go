// Package persistence owns a host's configuration: it keeps qubes.xml, serves the
// configuration to the other services over NATS (store.snapshot, store.apply,
// store.metrics) and gives them replicas that follow every change (Follow).
//
// # Durability
//
// The configuration's history is a JetStream stream, QUBES_CONFIG (package changelog),
// one subject per host: a base record (the whole configuration), then one record per
// accepted mutation, each taking the revision one further. Apply validates a mutation
// against the in-memory state, appends it and replies only once the stream has
// acknowledged the record and the record is durable: Config.SyncLog (the embedded
// server's StreamSyncer, which fsyncs the stream's blocks) ran after the append.
// Appends are serial, but the sync is shared (group commit, groupSync): a change waits
// for the running sync if it started after the change's append, else for the next,
// one fsync for every change appended meanwhile. A caller that sends several changes
// in flight appends with DeferSync and asks for the sync (store.sync) before it
// acknowledges them; the append starts a sync already, so it is often done by then. So an acknowledged change survives the
// whole process being killed and, with SyncLog, a power cut. Without SyncLog (NATS in
// another process) the acknowledgement means what the server's storage makes it:
// a killed process, or with replicas 3 or sync_interval: always, a power cut too.
// qubes.xml is a checkpoint of
// that history (package checkpoint): qubes.xml.rev beside it names the revision and
// stream sequence the file holds. On start (Serve), the store loads qubes.xml and reads
// the records after the marked sequence; without a usable qubes.xml (an empty data dir,
// a marker the stream no longer holds) it starts from the log's latest base. A host with
// no records yet starts its log with a base of qubes.xml as it is.
//
// # Writes of qubes.xml
//
// qubes.xml is written only after mutations with ChangesConfig and at Close, never for
// reads. Unlike qubesd it is not on the reply path: the durable log is the record, and
// qubes.xml follows it in the background (saveLoop), never ahead of the durable log.
// Writes are coalesced (flusher): every change made while a write runs shares the next
// one, and the writer pauses nine times as long as a write took (at most 5 s), so at
// 10 000 qubes a stream of changes costs about a tenth of the time in writes, and the
// change log's fsyncs meet a qubes.xml fsync on the same disk that much less often.
// store.flush (and Save, Close) waits for a write that started after it was asked.
// Each write is temporary file, fsync, rename, directory fsync, for the marker first
// and qubes.xml second, under an exclusive flock on qubes.xml.lock, so processes
// sharing the data dir never write at once; a write whose revision the file already
// holds is skipped.
//
// # Serial changes and several instances
//
// Mutations on one instance are serial (one lock held from validation to the stream's
// acknowledgement). Across instances, every append is conditional on the host's last
// record being the one the instance applied last (Nats-Expected-Last-Subject-Sequence).
// The loser of a race appends nothing, reads the records it missed and validates its
// mutation again against the new state. So the records form one history and every
// revision holds config.CheckInvariants, however many instances serve.
//
// # Takeover
//
// Every instance of a host serves in the same micro queue group and keeps following
// the stream (an ordered consumer), so a second instance is a hot standby: it holds the
// state up to the last record and, as soon as the first dies, NATS routes every request
// to it (calls in flight to the dead one time out; Client retries while no instance
// listens). Nothing acknowledged is lost because an acknowledgement means the record is
// in the stream, and the survivor reads every record before it appends. No lease is
// needed: a second active instance is never harmful, only slower when both take
// writes (conflicts make one re-read). A standby on the same data dir writes qubes.xml
// under the same lock; one on another data dir builds its own qubes.xml from the log.
//
// # Cost
//
// The state is an indexed.Config: a mutation costs what it touches (a property change
// on 1000 qubes takes microseconds), not a copy and a full check of the configuration.
// Snapshots and writes encode a view that shares everything but the domain list, so
// neither holds the lock while encoding.
package persistence
