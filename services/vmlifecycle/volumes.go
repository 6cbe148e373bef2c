package vmlifecycle

import (
	"context"
	"fmt"
	"time"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Volumes is what the lifecycle needs of the storage service (storageapi.Client): a
// qube's volumes verified after its device check (qubesd's Storage.verify: a
// missing image) and prepared before its domain is created (Storage.start), each
// failure being the start's error; stopped again when the domain then cannot be
// created, and a disposable's removed with it.
type Volumes interface {
	VerifyStart(ctx context.Context, qube string) error
	PrepareStart(ctx context.Context, qube string) error
	StopVolumes(ctx context.Context, qube string) error
	RemoveVolumes(ctx context.Context, qube, volumeConfig string, rev uint64) error
}

// verifyVolumes checks q's volumes before its start; the error is the start's.
func (s *Service) verifyVolumes(ctx context.Context, q Qube) error {
	if s.cfg.Volumes == nil {
		return nil
	}
	if err := s.cfg.Volumes.VerifyStart(ctx, q.Name); err != nil {
		return fmt.Errorf("verify volumes of %s: %w", q.Name, err)
	}
	return nil
}

// prepareVolumes prepares q's volumes for its start; the error is the start's (a
// qubesd exception as the storage answered it, or an abort).
func (s *Service) prepareVolumes(ctx context.Context, q Qube) error {
	if s.cfg.Volumes == nil {
		return nil
	}
	if err := s.cfg.Volumes.PrepareStart(ctx, q.Name); err != nil {
		return fmt.Errorf("prepare volumes of %s: %w", q.Name, err)
	}
	return nil
}

// stopVolumes stops q's prepared volumes after its domain could not be created.
func (s *Service) stopVolumes(ctx context.Context, q Qube) {
	if s.cfg.Volumes == nil {
		return
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.cfg.Volumes.StopVolumes(sctx, q.Name); err != nil {
		s.log.Warn("stop volumes after a failed start", "vm", q.Name, "err", err)
	}
}

// volumeConfig is q's <volume-config> in the replica ("" if it is gone).
func (s *Service) volumeConfig(name string) string {
	var vc string
	s.model.ViewIndexed(func(_ *config.Config, byName func(string) *config.Domain) {
		if d := byName(name); d != nil {
			vc = string(d.VolumeConfig)
		}
	})
	return vc
}

// removeVolumes removes the volumes of a disposable removed after it stopped.
func (s *Service) removeVolumes(ctx context.Context, name, volumeConfig string, rev uint64) {
	if s.cfg.Volumes == nil || volumeConfig == "" {
		return
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.cfg.Volumes.RemoveVolumes(rctx, name, volumeConfig, rev); err != nil {
		s.log.Warn("remove the volumes of a disposable", "vm", name, "err", err)
	}
}
