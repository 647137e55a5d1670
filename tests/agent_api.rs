//! The agent's VM and guest I/O API against a real agent process.

mod common_agent;

use common_agent::{AgentProc, TOKEN};
use sha2::Digest;
use twinsite::site::{CreateVm, DiskSpec, Power, PowerAction, Role, SiteError, SiteProvider};

const MIB: u64 = 1 << 20;

fn spec(size: u64, is: bool) -> CreateVm {
    CreateVm {
        disks: vec![DiskSpec {
            name: "disk0".into(),
            size_bytes: size,
        }],
        power: Power::Running,
        integration_services: is,
    }
}

#[tokio::test]
async fn vms_guest_io_digest_and_restart() {
    let root = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start("primary", root.path());
    let c = agent.client();
    c.health().await.unwrap();

    let vm = c.create_vm("web-01", &spec(4 * MIB, true)).await.unwrap();
    assert_eq!((vm.power, vm.role), (Power::Running, Role::Primary));
    // Same create again is a no-op.
    c.create_vm("web-01", &spec(4 * MIB, true)).await.unwrap();

    // A new disk reads as zeros; writes land at any offset and length, across blocks.
    let mut model = vec![0u8; (4 * MIB) as usize];
    assert_eq!(
        c.read_disk("web-01", "disk0", 100, 10).await.unwrap(),
        vec![0u8; 10]
    );
    for (off, len, byte) in [(0u64, 10usize, 1u8), (65530, 20, 2), (3 * MIB, 200_000, 3)] {
        c.write_disk("web-01", "disk0", off, vec![byte; len])
            .await
            .unwrap();
        model[off as usize..off as usize + len].fill(byte);
    }
    assert_eq!(
        c.read_disk("web-01", "disk0", 65520, 40).await.unwrap(),
        model[65520..65560]
    );
    let want = hex::encode(sha2::Sha256::digest(&model));
    assert_eq!(c.digest("web-01", "disk0").await.unwrap(), want);

    // SIGKILL and restart: acknowledged writes and VM state are still there.
    agent.kill_and_restart();
    let c = agent.client();
    assert_eq!(c.digest("web-01", "disk0").await.unwrap(), want);
    let list = c.list_vms().await.unwrap();
    assert_eq!(list.site, "primary");
    assert_eq!(list.vms.len(), 1);

    // Power: Shutdown with integration services, Start, PowerOff; idempotent by operation id.
    let v = c
        .power("web-01", PowerAction::Shutdown, "op-1")
        .await
        .unwrap();
    assert_eq!(v.power, Power::Off);
    c.power("web-01", PowerAction::Start, "op-2").await.unwrap();
    // Repeating op-1 answers its first result and does not shut the VM down again.
    let again = c
        .power("web-01", PowerAction::Shutdown, "op-1")
        .await
        .unwrap();
    assert_eq!(again.power, Power::Off);
    assert_eq!(c.get_vm("web-01").await.unwrap().power, Power::Running);

    // Without integration services Shutdown fails, PowerOff works.
    c.create_vm("legacy", &spec(MIB, false)).await.unwrap();
    let err = c
        .power("legacy", PowerAction::Shutdown, "op-3")
        .await
        .unwrap_err();
    assert!(matches!(err, SiteError::Conflict(_)), "{err:?}");
    c.power("legacy", PowerAction::PowerOff, "op-4")
        .await
        .unwrap();
    c.delete_vm("legacy", "op-5").await.unwrap();
    c.delete_vm("legacy", "op-5").await.unwrap();
    assert!(matches!(
        c.get_vm("legacy").await,
        Err(SiteError::NotFound(_))
    ));
}

#[tokio::test]
async fn bad_input_is_refused_with_4xx_and_nothing_applied() {
    let root = tempfile::tempdir().unwrap();
    let agent = AgentProc::start("primary", root.path());
    let c = agent.client();
    c.create_vm("vm1", &spec(MIB, true)).await.unwrap();
    c.write_disk("vm1", "disk0", 0, vec![7u8; 100])
        .await
        .unwrap();
    let before = c.digest("vm1", "disk0").await.unwrap();

    let http = reqwest::Client::new();
    let u = |p: &str| format!("{}{}", agent.url, p);
    let auth = format!("Bearer {TOKEN}");
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("no token", http.get(u("/v1/vms")), 401),
        ("wrong token", http.get(u("/v1/vms")).bearer_auth("nope"), 401),
        ("unknown vm", http.get(u("/v1/vms/ghost")).header("authorization", &auth), 404),
        ("unknown disk", http.get(u("/v1/vms/vm1/disks/nope/digest")).header("authorization", &auth), 404),
        ("write past end", http.put(u("/v1/vms/vm1/disks/disk0/data?offset=1048570")).header("authorization", &auth).body(vec![1u8; 10]), 400),
        ("read past end", http.get(u("/v1/vms/vm1/disks/disk0/data?offset=1048570&length=10")).header("authorization", &auth), 400),
        ("offset missing", http.put(u("/v1/vms/vm1/disks/disk0/data")).header("authorization", &auth).body(vec![1u8; 10]), 400),
        ("offset not a number", http.put(u("/v1/vms/vm1/disks/disk0/data?offset=x")).header("authorization", &auth).body(vec![1u8; 10]), 400),
        ("disk size 0", http.put(u("/v1/vms/vm2")).header("authorization", &auth).json(&serde_json::json!({"disks": [{"name": "d", "sizeBytes": 0}], "power": "Running"})), 400),
        ("disk over limit", http.put(u("/v1/vms/vm2")).header("authorization", &auth).json(&serde_json::json!({"disks": [{"name": "d", "sizeBytes": 2u64 << 30}], "power": "Running"})), 400),
        ("malformed body", http.put(u("/v1/vms/vm2")).header("authorization", &auth).header("content-type", "application/json").body("{not json"), 400),
        ("wrong field type", http.put(u("/v1/vms/vm2")).header("authorization", &auth).json(&serde_json::json!({"disks": "many"})), 400),
        ("bad power action", http.post(u("/v1/vms/vm1/power")).header("authorization", &auth).json(&serde_json::json!({"action": "Explode"})), 400),
    ];
    for (name, req, want) in cases {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, want, "{name}: {body}");
        assert!(body["error"].is_string(), "{name}: error body {body}");
    }
    // Write to a VM that is off: 409.
    c.power("vm1", PowerAction::PowerOff, "off-1")
        .await
        .unwrap();
    let err = c
        .write_disk("vm1", "disk0", 0, vec![9u8; 10])
        .await
        .unwrap_err();
    assert!(matches!(err, SiteError::Conflict(_)), "{err:?}");
    // Deleting a running VM: 409.
    c.create_vm("vm3", &spec(MIB, true)).await.unwrap();
    assert!(matches!(
        c.delete_vm("vm3", "del-1").await,
        Err(SiteError::Conflict(_))
    ));

    // Nothing was half-applied: vm1 unchanged, vm2 never created.
    assert_eq!(c.digest("vm1", "disk0").await.unwrap(), before);
    assert!(matches!(c.get_vm("vm2").await, Err(SiteError::NotFound(_))));
    let names: Vec<String> = c
        .list_vms()
        .await
        .unwrap()
        .vms
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["vm1", "vm3"]);
}
