package embedded

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// ErrNotLocal: the stream's files are not on this machine (a server without
// JetStream, or one in another process), so StreamSyncer cannot make them durable.
var ErrNotLocal = errors.New("stream files are not local")

// StreamSyncer makes what an embedded server has acknowledged on one stream survive a
// power cut, without the server syncing every write of every stream (SyncAlways).
//
// Why this holds: for a file-backed stream with one replica in the default persist
// mode, the server writes each message to its block file (write(2)) before it sends
// the acknowledgement, and fsync(2) flushes an inode's dirty pages whichever
// descriptor wrote them. So after Sync returns, every message acknowledged before Sync
// started is on disk. The server's own state files (index.db) are not synced: after a
// power cut the server rebuilds them from the blocks, as it does after a killed
// process. One Sync covers every message acknowledged before it: callers get group
// commit by sharing calls (several appends, one Sync).
//
// It knows the file store's layout (<store>/jetstream/<account>/streams/<stream>/
// msgs/*.blk), which nats-server has kept since 2.2; TestStreamSyncerFindsBlocks
// fails if that changes.
type StreamSyncer struct {
	root string // the server's JetStream dir: directories up to its parent are synced once
	dir  string // <…>/streams/<stream>

	mu      sync.Mutex // one Sync at a time; it keeps the stamps
	stamps  map[string]stamp
	blocks  string // the names of the blocks when the message directory was last synced
	parents bool   // the stream's directories up to root were synced

	// The newest block, open since the last full sync (nil before one, and after
	// Close). While no block after it exists and it is still linked, it is the only
	// block an append can have written since: the server names a new block after the
	// newest one (index+1), and a purge that removes every block unlinks it.
	last     *os.File
	lastIdx  uint64
	lastFull time.Time
	closed   bool // after Close no descriptor is kept
	fullRuns int  // full syncs, for the tests
}

// fullSyncEvery bounds how long a Sync may take the newest-block shortcut: a full one
// then looks at every block and the directory again (blocks a compaction removed).
const fullSyncEvery = time.Second

type stamp struct {
	size int64
	mod  time.Time
}

// NewStreamSyncer returns the syncer of stream in account ("" for the global account,
// which in-process and nkey users without accounts belong to) of ns.
func NewStreamSyncer(ns *server.Server, account, stream string) (*StreamSyncer, error) {
	root := ns.StoreDir()
	if root == "" {
		return nil, fmt.Errorf("stream %s: %w", stream, ErrNotLocal)
	}
	if account == "" {
		account = server.DEFAULT_GLOBAL_ACCOUNT
	}
	return &StreamSyncer{root: root, dir: filepath.Join(root, account, "streams", stream),
		stamps: map[string]stamp{}}, nil
}

// Sync fsyncs the stream's files that changed since the last Sync and, when blocks
// were created or removed since, its message directory; the first call also syncs the
// stream's metadata and the directories above it (a stream created since the last
// power cut). ctx is checked between files.
//
// Between full syncs, at most fullSyncEvery apart, a Sync that finds no new block
// fsyncs the newest block alone through the descriptor it keeps: three system calls
// instead of reading the directory, a stat per block and an open and close.
func (s *StreamSyncer) Sync(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last != nil && time.Since(s.lastFull) < fullSyncEvery {
		if done, err := s.syncNewest(); done || err != nil {
			return err
		}
	}
	return s.syncAll(ctx)
}

// syncNewest fsyncs the newest block if no block was created after it and it is still
// linked; done is false when a full sync must run instead.
func (s *StreamSyncer) syncNewest() (done bool, err error) {
	next := filepath.Join(s.dir, "msgs", strconv.FormatUint(s.lastIdx+1, 10)+".blk")
	if _, err := os.Lstat(next); !errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	info, err := s.last.Stat()
	if err != nil {
		return false, nil
	}
	if st, ok := info.Sys().(*syscall.Stat_t); !ok || st.Nlink == 0 {
		return false, nil
	}
	if err := s.last.Sync(); err != nil {
		return true, fmt.Errorf("sync stream: %w", err)
	}
	return true, nil
}

// Close closes the newest block's descriptor; later Syncs are full ones.
func (s *StreamSyncer) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if s.last == nil {
		return nil
	}
	err := s.last.Close()
	s.last = nil
	return err
}

// syncAll fsyncs every block that changed since it last ran, then opens the newest.
func (s *StreamSyncer) syncAll(ctx context.Context) error {
	s.fullRuns++
	msgs := filepath.Join(s.dir, "msgs")
	entries, err := os.ReadDir(msgs)
	if err != nil {
		return fmt.Errorf("sync stream: %w", err)
	}
	var blocks strings.Builder
	var newest uint64
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".blk") {
			continue
		}
		if idx, err := strconv.ParseUint(strings.TrimSuffix(e.Name(), ".blk"), 10, 64); err == nil {
			newest = max(newest, idx)
		}
		blocks.WriteString(e.Name())
		blocks.WriteByte('/')
		if err := ctx.Err(); err != nil {
			return err
		}
		info, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // compacted away meanwhile
		}
		if err != nil {
			return fmt.Errorf("sync stream: %w", err)
		}
		st := stamp{info.Size(), info.ModTime()}
		if s.stamps[e.Name()] == st {
			continue
		}
		if err := fsync(filepath.Join(msgs, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("sync stream: %w", err)
		}
		s.stamps[e.Name()] = st
	}
	// New and removed blocks are directory entries; appends to a block are not (one
	// fsync per group of changes instead of two).
	if blocks.String() != s.blocks {
		if err := fsync(msgs); err != nil {
			return fmt.Errorf("sync stream: %w", err)
		}
		s.blocks = blocks.String()
	}
	if !s.parents {
		paths := []string{filepath.Join(s.dir, "meta.inf"), filepath.Join(s.dir, "meta.sum")}
		for d := s.dir; d != s.root && strings.HasPrefix(d, s.root); d = filepath.Dir(d) {
			paths = append(paths, d)
		}
		for _, p := range append(paths, s.root, filepath.Dir(s.root)) {
			if err := fsync(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("sync stream: %w", err)
			}
		}
		s.parents = true
	}
	return s.openNewest(msgs, newest)
}

// openNewest keeps a descriptor of block idx (0: none) for the shortcut.
func (s *StreamSyncer) openNewest(msgs string, idx uint64) error {
	if s.last != nil {
		_ = s.last.Close() // read-only: nothing to lose
		s.last = nil
	}
	if idx == 0 || s.closed {
		return nil
	}
	f, err := os.Open(filepath.Join(msgs, strconv.FormatUint(idx, 10)+".blk"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil // compacted away meanwhile: the next Sync is a full one
	}
	if err != nil {
		return fmt.Errorf("sync stream: %w", err)
	}
	s.last, s.lastIdx, s.lastFull = f, idx, time.Now()
	return nil
}

func fsync(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = f.Sync()
	return errors.Join(err, f.Close())
}
