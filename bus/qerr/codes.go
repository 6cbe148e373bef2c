package qerr

import "errors"

// Codes is a wire table for errors that are not qubesd exceptions: a service whose
// replies carry a short code for a Go sentinel error (persistence's config errors)
// declares its pairs once, and both ends use the same table, so the caller can still
// match the sentinel with errors.Is after the round trip.
type Codes []CodeOf

// CodeOf pairs a code with the sentinel it stands for.
type CodeOf struct {
	Code string
	Err  error
}

// Code is the code of the first entry whose sentinel err matches (errors.Is), or "".
func (t Codes) Code(err error) string {
	for _, c := range t {
		if errors.Is(err, c.Err) {
			return c.Code
		}
	}
	return ""
}

// Err is the sentinel of code, or nil for a code not in the table.
func (t Codes) Err(code string) error {
	for _, c := range t {
		if c.Code == code {
			return c.Err
		}
	}
	return nil
}
