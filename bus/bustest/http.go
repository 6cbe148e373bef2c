package bustest

import (
	"io"
	"net/http"
	"testing"
)

// HTTPGet fetches url and returns the status and the body, failing the test if the
// request or the read fails.
func HTTPGet(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}
