package main

import (
	"bufio"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The repository's root, from this package's directory.
const repoRoot = "../.."

// specDir holds the specification the code cites (methods.md §1.4, events.md §3, …).
const specDir = "docs/spec"

var (
	// refToken finds, in order, a mention of a markdown file (docs/spec/events.md,
	// [events.md](../../docs/spec/events.md), methods.md) and a section reference
	// (§5, §1.4, §3–5: a range names both ends).
	refToken = regexp.MustCompile(`([\w./-]*?)([\w-]+\.md)\b|§\s*(\d+(?:\.\d+)*)(?:\s*[–-]\s*(\d+(?:\.\d+)*))?`)
	// heading is a numbered section heading: "## 5. Power states", "### 5.2 Illegal …".
	heading = regexp.MustCompile(`^#+\s+(\d+(?:\.\d+)*)\.?\s`)
)

// Every reference to the specification, in code comments, tests and the documents,
// resolves in a clone: the file is under docs/spec and has the section. A bare "§N"
// refers to the last file mentioned before it in the same comment block (in a
// markdown file: the same line), else to the first spec file the Go file mentions,
// else (in a spec file) to the file itself.
func TestSpecReferencesResolve(t *testing.T) {
	sections := map[string]map[string]bool{} // spec file name → section numbers
	entries, err := os.ReadDir(filepath.Join(repoRoot, specDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".md") {
			sections[e.Name()] = headings(t, filepath.Join(repoRoot, specDir, e.Name()))
		}
	}
	refs := 0
	err = filepath.WalkDir(repoRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(repoRoot, p)
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			switch d.Name() {
			case ".git", "testdata", "run", "bin", "node_modules":
				return filepath.SkipDir
			}
			return nil
		}
		var blocks [][]line
		switch {
		case strings.HasSuffix(p, ".go"):
			blocks = goBlocks(t, p)
		case strings.HasSuffix(p, ".md"):
			blocks = mdBlocks(t, p)
		default:
			return nil
		}
		// The default file of a bare reference: a spec file itself, else the first
		// spec file the file mentions.
		def := ""
		if path.Dir(rel) == specDir {
			def = path.Base(rel)
		}
		for _, b := range blocks {
			for _, l := range b {
				for _, m := range refToken.FindAllStringSubmatch(l.text, -1) {
					if m[2] != "" && sections[m[2]] != nil && def == "" {
						def = m[2]
					}
				}
			}
		}
		for _, b := range blocks {
			current := ""
			for _, l := range b {
				for _, m := range refToken.FindAllStringSubmatch(l.text, -1) {
					if m[2] != "" { // a file mention
						current = m[2]
						if strings.Contains(m[1], "docs/") {
							target := path.Clean(path.Join(path.Dir(rel), m[1]+m[2]))
							if strings.HasPrefix(m[1], "docs/") {
								target = m[1] + m[2]
							}
							if _, err := os.Stat(filepath.Join(repoRoot, target)); err != nil {
								t.Errorf("%s:%d: %s%s: no such file in the repository", rel, l.n, m[1], m[2])
							}
						}
						continue
					}
					file := current
					if file == "" {
						file = def
					}
					for _, sec := range []string{m[3], m[4]} {
						if sec == "" {
							continue
						}
						refs++
						switch {
						case file == "":
							t.Errorf("%s:%d: §%s names no file (cite docs/spec/<file>.md §%s)", rel, l.n, sec, sec)
						case sections[file] == nil:
							t.Errorf("%s:%d: §%s of %s: not a file of %s", rel, l.n, sec, file, specDir)
						case !sections[file][sec]:
							t.Errorf("%s:%d: %s §%s: no such section", rel, l.n, file, sec)
						}
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if refs < 50 {
		t.Fatalf("found %d section references; the scan is broken", refs)
	}
}

// line is a line of text and its number in its file.
type line struct {
	n    int
	text string
}

// goBlocks splits a Go file into comment blocks (consecutive // lines) and single
// other lines (string literals of tests cite sections too).
func goBlocks(t *testing.T, p string) [][]line {
	var out [][]line
	var cur []line
	eachLine(t, p, func(n int, s string) {
		if strings.HasPrefix(strings.TrimSpace(s), "//") {
			cur = append(cur, line{n, s})
			return
		}
		if cur != nil {
			out = append(out, cur)
			cur = nil
		}
		out = append(out, []line{{n, s}})
	})
	if cur != nil {
		out = append(out, cur)
	}
	return out
}

// mdBlocks makes each line of a markdown file its own block: table rows cite
// different files side by side.
func mdBlocks(t *testing.T, p string) [][]line {
	var out [][]line
	eachLine(t, p, func(n int, s string) { out = append(out, []line{{n, s}}) })
	return out
}

func headings(t *testing.T, p string) map[string]bool {
	out := map[string]bool{}
	eachLine(t, p, func(_ int, s string) {
		if m := heading.FindStringSubmatch(s); m != nil {
			out[m[1]] = true
		}
	})
	return out
}

func eachLine(t *testing.T, p string, f func(n int, s string)) {
	t.Helper()
	fh, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		f(n, sc.Text())
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("%s: %v", p, err)
	}
}
