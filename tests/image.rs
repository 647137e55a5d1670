//! The container image: built from Containerfile with buildah (scripts/image-build.sh) from the
//! binary this test build produced, unpacked with umoci, and run once from its root filesystem
//! as the image's user.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_image_runs_the_binary_as_a_non_root_user() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "building and running the image (buildah, chroot) needs root, as scripts/test.sh runs"
    );
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("oci");
    let out = run(Command::new(repo().join("scripts/image-build.sh"))
        .arg(env!("CARGO_BIN_EXE_twinsite"))
        .arg(&layout));
    let last = out.lines().last().unwrap_or_default();
    let (image, name) = last
        .split_once(' ')
        .unwrap_or_else(|| panic!("unexpected last line: {last}"));

    // The chart's default image is this one, and runs as the image's user.
    let chart = yaml(&repo().join("charts/twinsite/Chart.yaml"));
    let values = yaml(&repo().join("charts/twinsite/values.yaml"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["appVersion"].as_str(), Some(version));
    assert_eq!(
        values["image"]["tag"].as_str(),
        Some(""),
        "the tag defaults to appVersion"
    );
    let repository = values["image"]["repository"].as_str().unwrap();
    assert_eq!(name, format!("{repository}:{version}"));
    assert_eq!(image, format!("{}:{version}", layout.display()));

    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", image])
        .arg(&bundle));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    let uid = config["process"]["user"]["uid"].as_u64().unwrap();
    assert_ne!(uid, 0, "the image runs as root");
    assert_eq!(
        Some(uid),
        values["podSecurityContext"]["runAsUser"].as_u64(),
        "the chart runs another user than the image's"
    );
    let gid = config["process"]["user"]["gid"].as_u64().unwrap();
    // The chart's Deployment gives args only: the entrypoint must be the binary.
    assert_eq!(config["process"]["args"][0], "/usr/bin/twinsite");

    // Distroless: the binary, its libraries, certificates and users; no shell.
    let rootfs = bundle.join("rootfs");
    assert!(!rootfs.join("bin/sh").exists(), "the image has a shell");
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").exists());

    let chroot = |args: &[&str]| {
        run(Command::new("chroot")
            .arg(format!("--userspec={uid}:{gid}"))
            .arg(&rootfs)
            .arg("/usr/bin/twinsite")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    };
    assert_eq!(chroot(&["--version"]).trim(), format!("twinsite {version}"));
    assert_eq!(
        chroot(&["crds"]),
        std::fs::read_to_string(repo().join("crds/twinsite.yaml")).unwrap(),
        "the image's `twinsite crds` differs from the checked-in CRDs"
    );
}
