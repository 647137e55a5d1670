//! The local control plane itself: a real etcd + kube-apiserver that kubectl and kube-rs reach.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use twinsite::envtest::{self, ControlPlane};

#[tokio::test]
async fn shared_control_plane_serves_kubectl_and_kube_rs() {
    let cp = envtest::shared().await;
    let out = cp
        .kubectl()
        .args(["version", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["serverVersion"]["major"], "1");
    assert_eq!(v["serverVersion"]["minor"], "35");

    let client = cp.client().await.unwrap();
    let ns: Api<Namespace> = Api::all(client);
    let mut obj = Namespace::default();
    obj.metadata.name = Some("envtest-smoke".into());
    ns.create(&PostParams::default(), &obj).await.unwrap();
    let out = cp
        .kubectl()
        .args(["get", "ns", "envtest-smoke", "-o", "name"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/envtest-smoke"
    );

    // The CRDs are installed and served.
    let out = cp.kubectl().args(["get", "rvm", "-A"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_private_control_plane_stops_when_dropped() {
    let cp = ControlPlane::start().await.unwrap();
    let (etcd, apiserver) = cp.pids();
    let dir = cp.dir().to_path_buf();
    assert!(cp.client().await.unwrap().apiserver_version().await.is_ok());
    drop(cp);
    for pid in [etcd, apiserver] {
        // After drop the processes are gone (reaped), so signal 0 fails.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "process {pid} still running after drop");
    }
    assert!(!dir.exists(), "temporary directory kept after drop");
}
