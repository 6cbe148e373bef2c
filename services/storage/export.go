package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/qubesbus/qubesbus/bus/qerr"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// A backup's reads of volumes (storageapi.OpExport, OpRead): qubesd's Volume.export,
// the committed data of a save_on_stop volume. Pools that keep images (the file
// pools, exporter) serve the clean image; the others, and images never written,
// export as holes of the volume's size.

// exportSource finds the volume a request names and the image it exports ("": none).
func (s *Service) exportSource(req storageapi.ExportRequest) (size, usage int64, path string, err error) {
	q, err := s.qubeVolumes(req.Qube)
	if err != nil {
		return 0, 0, "", err
	}
	for _, v := range q.vols {
		if v.Name != req.Volume {
			continue
		}
		p, err := s.poolOf(q.pools, v)
		if err != nil {
			return 0, 0, "", err
		}
		v = effective(p, v)
		usage := p.UsageOf(v)
		if ex, ok := p.(exporter); ok {
			if path, ok := ex.ExportPath(v); ok {
				if st, err := os.Stat(path); err == nil {
					return st.Size(), usage, path, nil
				}
			}
		}
		return p.Size(v), usage, "", nil
	}
	return 0, 0, "", qerr.Abort(fmt.Sprintf("qube %s has no volume %s", req.Qube, req.Volume))
}

// exportVolume answers OpExport.
func (s *Service) exportVolume(ctx context.Context, req storageapi.ExportRequest) (storageapi.ExportReply, error) {
	if err := s.syncSim(ctx); err != nil {
		return storageapi.ExportReply{}, err
	}
	size, usage, path, err := s.exportSource(req)
	if err != nil || path == "" {
		return storageapi.ExportReply{Size: size, Usage: usage}, err
	}
	ext, err := dataExtents(path, size)
	if err != nil {
		return storageapi.ExportReply{}, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return storageapi.ExportReply{Size: size, Usage: usage, Extents: ext}, nil
}

// readVolume answers OpRead; past the end of the data it reads zeros, as a hole.
func (s *Service) readVolume(_ context.Context, req storageapi.ExportRequest) (storageapi.ExportReply, error) {
	if req.Offset < 0 || req.Length < 0 || req.Length > storageapi.MaxRead {
		return storageapi.ExportReply{}, qerr.Abort("storage read: bad range")
	}
	_, _, path, err := s.exportSource(req)
	if err != nil {
		return storageapi.ExportReply{}, err
	}
	buf := make([]byte, req.Length)
	if path == "" {
		return storageapi.ExportReply{Data: buf}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return storageapi.ExportReply{}, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	defer f.Close()
	if _, err := f.ReadAt(buf, req.Offset); err != nil && !errors.Is(err, io.EOF) {
		return storageapi.ExportReply{}, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return storageapi.ExportReply{Data: buf}, nil
}

// Linux lseek whences (not in package syscall).
const (
	seekData = 3
	seekHole = 4
)

// dataExtents lists the data regions of a sparse file with SEEK_DATA and SEEK_HOLE;
// where the filesystem cannot tell, the whole file is one region.
func dataExtents(path string, size int64) ([]storageapi.Extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []storageapi.Extent
	for off := int64(0); off < size; {
		start, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole up to the end
		}
		if errors.Is(err, syscall.EINVAL) && off == 0 {
			return []storageapi.Extent{{Offset: 0, Length: size}}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("seek data in %s: %w", path, err)
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return nil, fmt.Errorf("seek hole in %s: %w", path, err)
		}
		end = min(end, size)
		if end > start {
			out = append(out, storageapi.Extent{Offset: start, Length: end - start})
		}
		off = end
	}
	return out, nil
}
