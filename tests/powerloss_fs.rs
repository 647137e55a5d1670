//! The power-loss filesystem of the crash suite, mounted for real: what a program made durable
//! through fsync survives a cut, nothing else does.

mod common_powerloss;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use common_powerloss::PowerLossDir;

fn sync_dir(p: &std::path::Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn a_cut_keeps_exactly_what_was_made_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = PowerLossDir::new(&tmp.path().join("data")).unwrap();
    let root = d.mountpoint.clone();

    // Durable: a file fsynced in a directory fsynced, with its mode.
    fs::create_dir(root.join("vms")).unwrap();
    let mut f = File::create(root.join("vms/kept")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    fs::set_permissions(root.join("vms/kept"), fs::Permissions::from_mode(0o600)).unwrap();
    sync_dir(&root.join("vms"));
    sync_dir(&root);
    // Written after the fsync: lost.
    f.write_all(b" and more").unwrap();
    drop(f);
    // Its name never synced: lost though its data was.
    let mut g = File::create(root.join("vms/unnamed")).unwrap();
    g.write_all(b"x").unwrap();
    g.sync_all().unwrap();
    // Write-to-temp and rename without the directory fsync: the old content comes back.
    fs::write(root.join("meta.json"), b"old").unwrap();
    File::open(root.join("meta.json"))
        .unwrap()
        .sync_all()
        .unwrap();
    sync_dir(&root);
    let mut t = File::create(root.join("meta.json.tmp")).unwrap();
    t.write_all(b"new").unwrap();
    t.sync_all().unwrap();
    fs::rename(root.join("meta.json.tmp"), root.join("meta.json")).unwrap();
    assert_eq!(fs::read(root.join("meta.json")).unwrap(), b"new");
    // A grown file keeps its synced size.
    let mut h = OpenOptions::new()
        .append(true)
        .open(root.join("vms/kept"))
        .unwrap();
    h.write_all(b"tail").unwrap();
    drop(h);
    assert_eq!(
        fs::read(root.join("vms/kept")).unwrap(),
        b"durable and moretail"
    );

    d.cut().unwrap();

    assert_eq!(fs::read(root.join("vms/kept")).unwrap(), b"durable");
    let mode = fs::metadata(root.join("vms/kept"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!root.join("vms/unnamed").exists());
    assert_eq!(fs::read(root.join("meta.json")).unwrap(), b"old");
    assert!(!root.join("meta.json.tmp").exists());
    // The backing directory holds the same durable state.
    assert_eq!(fs::read(d.backing.join("vms/kept")).unwrap(), b"durable");

    // The rename again, with the directory fsync: the new content survives.
    let mut t = File::create(root.join("meta.json.tmp")).unwrap();
    t.write_all(b"new").unwrap();
    t.sync_all().unwrap();
    fs::rename(root.join("meta.json.tmp"), root.join("meta.json")).unwrap();
    sync_dir(&root);
    d.cut().unwrap();
    assert_eq!(fs::read(root.join("meta.json")).unwrap(), b"new");
}
