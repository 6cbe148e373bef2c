// Package adminapi is the explicit Admin API method registry: one line per concrete
// method name of the stock qubesd registries (docs/spec/methods.md §14), with the
// options qubesd registers it with (docs/spec/protocol.md §2.2), its policy class and
// its owner service. The §N headings in the table are the sections of
// docs/spec/methods.md.
//
// Column mapping from docs/spec/methods.md: Dest `dom0` → AdminVMDest, `!dom0` →
// NotAdminVMDest, `any`/`dom0→all` → AnyDest; Arg/Payload `req` → Required, `—` →
// Forbidden, `opt` → Any; Save `yes` → ChangesConfig (qubes.xml only, see §13); Cls W →
// Write, X → Execute, otherwise Read.
package adminapi

import "github.com/qubesbus/qubesbus/bus/rpc"

var table = []rpc.Method{
	// §12 Streams (docs/spec/protocol.md §7): arg and payload forbidden, any dest, cancellable.
	{Name: "admin.Events", Service: rpc.Gateway, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Cancellable: true, Access: rpc.Read},
	{Name: "admin.vm.Stats", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Cancellable: true, Access: rpc.Read},

	// §1 Qube inventory.
	{Name: "admin.vm.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vmclass.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},

	// §1.1 Create / CreateInPool, one line per VM class.
	{Name: "admin.vm.Create.AppVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.Create.TemplateVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.Create.StandaloneVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.Create.AdminVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.Create.DispVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.Create.RemoteVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.CreateInPool.AppVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.CreateInPool.TemplateVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.CreateInPool.StandaloneVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.CreateInPool.AdminVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.CreateInPool.DispVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.CreateInPool.RemoteVM", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},

	// §1.2, §1.3 CreateDisposable and Remove. CreateDisposable saves before it adds the
	// two created-by tags; the save after success also covers them, which is harmless.
	{Name: "admin.vm.CreateDisposable", Service: rpc.Properties, Arg: rpc.Any, Payload: rpc.Any, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.Remove", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},

	// §1.4 Power operations and state (owned by vmlifecycle). Shutdown takes force/wait.
	{Name: "admin.vm.Start", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.Shutdown", Service: rpc.VMLifecycle, Arg: rpc.Any, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.Kill", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.Pause", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.Unpause", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.Suspend", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.Resume", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.CurrentState", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.Console", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Write},

	// §2 Qube properties.
	{Name: "admin.vm.property.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.property.Get", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.property.GetAll", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.property.GetDefault", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.property.Set", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Any, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.property.Reset", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.property.Help", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},

	// §3 Global properties (dest dom0).
	{Name: "admin.property.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.property.Get", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.property.GetAll", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.property.GetDefault", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.property.Set", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Any, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.property.Reset", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.property.Help", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},

	// §4 Features.
	{Name: "admin.vm.feature.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.feature.Get", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.feature.CheckWithTemplate", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.feature.CheckWithNetvm", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.feature.CheckWithAdminVM", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.feature.CheckWithTemplateAndAdminVM", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.feature.Set", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Any, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.feature.Remove", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},

	// §5 Tags. tag.Set saves even when the tag was already present.
	{Name: "admin.vm.tag.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.tag.Get", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.tag.Set", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.tag.Remove", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},

	// §6 Labels (dest dom0).
	{Name: "admin.label.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.label.Get", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.label.Index", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.label.Create", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.label.Remove", Service: rpc.Properties, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},

	// §7 Firewall (dest not dom0). Set writes the qube's firewall.xml itself, not
	// qubes.xml, so it does not change config in the qubes.xml sense (§13).
	{Name: "admin.vm.firewall.Get", Service: rpc.Devices, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.NotAdminVMDest, Access: rpc.Read},
	{Name: "admin.vm.firewall.Set", Service: rpc.Devices, Arg: rpc.Forbidden, Payload: rpc.Required, Dest: rpc.NotAdminVMDest, Access: rpc.Write},
	{Name: "admin.vm.firewall.Reload", Service: rpc.Devices, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.NotAdminVMDest, Access: rpc.Execute},

	// §8 Notes (dest not dom0). Set writes notes.txt, not qubes.xml (§13).
	{Name: "admin.vm.notes.Get", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.NotAdminVMDest, Access: rpc.Read},
	{Name: "admin.vm.notes.Set", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Required, Dest: rpc.NotAdminVMDest, Access: rpc.Write},

	// §9 Devices: device classes, then the 8 methods for each of pci and block.
	{Name: "admin.deviceclass.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.vm.device.pci.Available", Service: rpc.Devices, Arg: rpc.Any, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.device.pci.Assigned", Service: rpc.Devices, Arg: rpc.Any, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.device.pci.Attached", Service: rpc.Devices, Arg: rpc.Any, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.device.pci.Assign", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.device.pci.Unassign", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.device.pci.Attach", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Any, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.device.pci.Detach", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.device.pci.Set.assignment", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.device.block.Available", Service: rpc.Devices, Arg: rpc.Any, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.device.block.Assigned", Service: rpc.Devices, Arg: rpc.Any, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.device.block.Attached", Service: rpc.Devices, Arg: rpc.Any, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.device.block.Assign", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.device.block.Unassign", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.device.block.Attach", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Any, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.device.block.Detach", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Execute},
	{Name: "admin.vm.device.block.Set.assignment", Service: rpc.Devices, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},

	// §9 Denied device interfaces. qubesd saves Add/Remove only if the list changed;
	// marked ChangesConfig (§13 lists them): saving an unchanged config is harmless.
	{Name: "admin.vm.device.denied.List", Service: rpc.Devices, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.device.denied.Add", Service: rpc.Devices, Arg: rpc.Forbidden, Payload: rpc.Any, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.device.denied.Remove", Service: rpc.Devices, Arg: rpc.Forbidden, Payload: rpc.Any, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},

	// §10 Volumes. Resize is saved by qubesd even on failure; ChangesConfig only covers
	// success, the handler must save on failure itself if that matters. CloneFrom writes
	// (hands out a token) but does not save.
	{Name: "admin.vm.volume.List", Service: rpc.Storage, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.volume.Info", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.volume.ListSnapshots", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Read},
	{Name: "admin.vm.volume.Revert", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.volume.Resize", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.volume.Clear", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.volume.CloneFrom", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AnyDest, Access: rpc.Write},
	{Name: "admin.vm.volume.CloneTo", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.volume.Set.revisions_to_keep", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.volume.Set.rw", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.vm.volume.Set.ephemeral", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AnyDest, ChangesConfig: true, Access: rpc.Write},

	// §10 Pools (dest dom0).
	{Name: "admin.pool.List", Service: rpc.Storage, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.pool.ListDrivers", Service: rpc.Storage, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.pool.Info", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.pool.UsageDetails", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.pool.volume.List", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.pool.Add", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.pool.Remove", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.pool.Set.revisions_to_keep", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},
	{Name: "admin.pool.Set.ephemeral_volatile", Service: rpc.Storage, Arg: rpc.Required, Payload: rpc.Required, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Write},

	// §11 Backup (dest dom0). Execute is classified R+X by qubesd (so Execute, not
	// Write) yet saves qubes.xml on success (backup timestamps, §13): the one
	// ChangesConfig method whose access is not Write.
	{Name: "admin.backup.Info", Service: rpc.Backup, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Read},
	{Name: "admin.backup.Execute", Service: rpc.Backup, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, ChangesConfig: true, Access: rpc.Execute},
	{Name: "admin.backup.Cancel", Service: rpc.Backup, Arg: rpc.Required, Payload: rpc.Forbidden, Dest: rpc.AdminVMDest, Access: rpc.Execute},
}

// Registry holds every Admin API method; it panics at start-up if the table is broken.
var Registry = rpc.NewRegistry(table...)
