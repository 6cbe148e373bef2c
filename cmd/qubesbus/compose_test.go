package main

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

// composeFile is the part of docker-compose.yml this test reads (YAML merge keys
// resolved by the decoder).
type composeFile struct {
	Services map[string]struct {
		Command     []string          `yaml:"command"`
		Environment map[string]string `yaml:"environment"`
		Volumes     []string          `yaml:"volumes"`
		Deploy      struct {
			Replicas int `yaml:"replicas"`
		} `yaml:"deploy"`
		Healthcheck *struct {
			Test []string `yaml:"test"`
		} `yaml:"healthcheck"`
		DependsOn any `yaml:"depends_on"`
	} `yaml:"services"`
}

// No Docker engine runs on the development machines, so the compose file is checked
// against the code instead: every service qubesbus serves runs in it as its own NATS
// user, which deploy/nats defines, with the instance counts the cluster issue asks for.
func TestComposeRunsEveryServiceAsItsOwnUser(t *testing.T) {
	raw, err := os.ReadFile("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	var c composeFile
	if err := yaml.Unmarshal(raw, &c); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	perms, err := os.ReadFile("../../deploy/nats/permissions.conf")
	if err != nil {
		t.Fatal(err)
	}
	users := map[string]bool{}
	for _, m := range regexp.MustCompile(`user: (\w+), password: \$(\w+)`).FindAllStringSubmatch(string(perms), -1) {
		users[m[1]] = true
		if !strings.Contains(string(raw), m[2]) {
			t.Errorf("compose never passes %s (user %s)", m[2], m[1])
		}
	}
	wantReplicas := map[string]int{"persistence": 2, "properties": 2, "vmlifecycle": 2, "storage": 2, "devices": 0, "backup": 0, "hypervisor": 0, "gateway": 0}
	for _, name := range system.Services {
		s, ok := c.Services[name]
		if !ok {
			t.Errorf("service %s is not in docker-compose.yml", name)
			continue
		}
		if len(s.Command) < 2 || s.Command[0] != "serve" || s.Command[1] != name {
			t.Errorf("%s runs %v, want serve %s", name, s.Command, name)
		}
		if u := s.Environment["QUBESBUS_NATS_USER"]; u != name || !users[u] {
			t.Errorf("%s connects as %q; want its own user, defined in deploy/nats", name, u)
		}
		if s.Environment["QUBESBUS_NATS_URL"] == "" || s.Environment["QUBESBUS_REPLICAS"] != "3" {
			t.Errorf("%s does not use the 3-node cluster: %v", name, s.Environment)
		}
		if want, ok := wantReplicas[name]; !ok || s.Deploy.Replicas != want {
			t.Errorf("%s has %d replicas, want %d", name, s.Deploy.Replicas, want)
		}
	}
	setup := c.Services["setup"]
	if !slices.Equal(setup.Command, []string{"setup"}) || setup.Environment["QUBESBUS_NATS_USER"] != "admin" {
		t.Errorf("setup runs %v as %q, want setup as admin", setup.Command, setup.Environment["QUBESBUS_NATS_USER"])
	}
	gw := c.Services["gateway"]
	if len(gw.Volumes) == 0 || !strings.HasSuffix(gw.Volumes[0], ":/run/qubesbus") || gw.Healthcheck == nil {
		t.Errorf("gateway: socket mount %v, health check %v", gw.Volumes, gw.Healthcheck)
	}
	for _, n := range []string{"n1", "n2", "n3"} {
		if _, ok := c.Services[n]; !ok {
			t.Errorf("NATS node %s missing", n)
		}
	}
}
