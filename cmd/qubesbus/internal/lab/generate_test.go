package lab

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// The generator's qubes are written exactly like the ones real qubesd wrote into
// qubes-1000.xml (apart from the uuid, which is the lab's own).
func TestGenerateMatchesQubesdShape(t *testing.T) {
	seed, err := qubesxml.Load("../../../../testdata/qubes.xml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := Generate(seed, "h1", 1000)
	if err != nil {
		t.Fatal(err)
	}
	got, err := qubesxml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("../../../../testdata/qubes-1000.xml")
	if err != nil {
		t.Fatal(err)
	}
	strip := func(b []byte) []string {
		var out []string
		for _, l := range strings.Split(string(b), "\n") {
			if !strings.Contains(l, `name="uuid"`) {
				out = append(out, l)
			}
		}
		return out
	}
	g, w := strip(got), strip(want)
	if len(g) != len(w) {
		t.Fatalf("%d lines, qubesd wrote %d", len(g), len(w))
	}
	for i := range g {
		if g[i] != w[i] {
			t.Fatalf("line %d:\n got %s\nwant %s", i+1, g[i], w[i])
		}
	}
	again, _ := Generate(seed, "h1", 1000)
	b2, _ := qubesxml.Marshal(again)
	if !bytes.Equal(got, b2) {
		t.Fatal("generation is not reproducible")
	}
	other, _ := Generate(seed, "h2", 1000)
	b3, _ := qubesxml.Marshal(other)
	if bytes.Equal(got, b3) {
		t.Fatal("two hosts got the same uuids")
	}
}
