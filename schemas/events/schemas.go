// Package events holds the JSON Schemas of qubesbus's contracts on NATS: the data of
// every Qubes event (event-data.schema.json) and the request/reply envelope headers
// (envelope.schema.json), and validates values against them.
package events

import (
	"bytes"
	"embed"
	"encoding/json"
	"fmt"
	"strings"
	"sync"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

//go:embed *.schema.json
var files embed.FS

const (
	eventDataID = "https://qubesbus.dev/schemas/event-data.json"
	envelopeID  = "https://qubesbus.dev/schemas/request-envelope.json"
)

var (
	once     sync.Once
	compiler *jsonschema.Compiler
	cache    sync.Map // location → *jsonschema.Schema
	loadErr  error
)

func load() {
	compiler = jsonschema.NewCompiler()
	for name, id := range map[string]string{"event-data.schema.json": eventDataID, "envelope.schema.json": envelopeID} {
		b, err := files.ReadFile(name)
		if err != nil {
			loadErr = err
			return
		}
		doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
		if err != nil {
			loadErr = fmt.Errorf("%s: %w", name, err)
			return
		}
		if err := compiler.AddResource(id, doc); err != nil {
			loadErr = fmt.Errorf("%s: %w", name, err)
			return
		}
	}
}

func schema(loc string) (*jsonschema.Schema, error) {
	once.Do(load)
	if loadErr != nil {
		return nil, loadErr
	}
	if s, ok := cache.Load(loc); ok {
		return s.(*jsonschema.Schema), nil
	}
	s, err := compiler.Compile(loc)
	if err != nil {
		return nil, err
	}
	cache.Store(loc, s)
	return s, nil
}

// ValidateEventData checks the JSON data of an event with the given wire name (e.g.
// "property-set:netvm") against the schema of its base name.
func ValidateEventData(wireName string, data []byte) error {
	base, _, _ := strings.Cut(wireName, ":")
	s, err := schema(eventDataID + "#/$defs/" + base)
	if err != nil {
		return fmt.Errorf("no schema for event %q: %w", wireName, err)
	}
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("event %q data: %w", wireName, err)
	}
	if err := s.Validate(v); err != nil {
		return fmt.Errorf("event %q data: %w", wireName, err)
	}
	return nil
}

// ValidateHeaders checks envelope headers (first value of each) as a "request" or a
// "reply".
func ValidateHeaders(kind string, h map[string][]string) error {
	s, err := schema(envelopeID + "#/$defs/" + kind)
	if err != nil {
		return err
	}
	flat := map[string]any{}
	for k, vs := range h {
		if len(vs) > 0 {
			flat[k] = vs[0]
		}
	}
	b, _ := json.Marshal(flat)
	v, _ := jsonschema.UnmarshalJSON(bytes.NewReader(b))
	if err := s.Validate(v); err != nil {
		return fmt.Errorf("%s headers: %w", kind, err)
	}
	return nil
}
