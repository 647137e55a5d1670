//! The agent's VM and guest I/O API against a real agent process.

#[path = "../common_agent/mod.rs"]
mod common_agent;
#[path = "../hostile/mod.rs"]
mod hostile;
mod peer_answers;
mod request_budget;

use common_agent::{AgentProc, TOKEN};
use sha2::Digest;
use twinsite::site::{CreateVm, DiskSpec, Power, PowerAction, Role, SiteError, SiteProvider};

const MIB: u64 = 1 << 20;

fn spec(size: u64, is: bool) -> CreateVm {
    CreateVm {
        disks: vec![DiskSpec {
            name: "disk0".into(),
            size_bytes: size,
            format: None,
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

/// One raw HTTP/1.1 request, the path sent exactly as given (an HTTP client would normalize
/// `..` and `%2e%2e` away before the agent sees them). Answers the status and the JSON body.
async fn raw(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    // Written beside the read: an agent that refuses a large body answers before reading it.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        wr
    });
    let mut resp = Vec::new();
    let _ = rd.read_to_end(&mut resp).await;
    drop(writer.await);
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer: {text:?}"));
    let json = match (text.find('{'), text.rfind('}')) {
        (Some(a), Some(b)) if a < b => serde_json::from_str(&text[a..=b]).unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    (status, json)
}

/// Every file under `dir` with its length and content digest.
fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, (u64, String)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let key = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
            if e.file_type().unwrap().is_dir() {
                out.insert(format!("{key}/"), (0, String::new()));
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(
                    key,
                    (
                        bytes.len() as u64,
                        hex::encode(sha2::Sha256::digest(&bytes)),
                    ),
                );
            }
        }
    }
    out
}

const BAD_NAMES: &[&str] = &[
    "..",
    "%2e%2e",
    "%2E%2E",
    "a%2Fb",
    "..%2F..%2Fescaped",
    ".hidden",
    "a%00b",
    "a%20b",
];

#[tokio::test]
async fn hostile_input_on_every_route_is_refused_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let agent = AgentProc::start("primary", root.path());
    let c = agent.client();
    c.create_vm("vm1", &spec(4 * MIB, true)).await.unwrap();
    // The guest write route still takes bodies beyond the JSON limit.
    c.write_disk("vm1", "disk0", 0, vec![7u8; 2 * MIB as usize])
        .await
        .unwrap();
    // Valid (63 characters), but its drill copy `<vm>-test` would not be.
    let long_vm = "l".repeat(60);
    c.create_vm(&long_vm, &spec(MIB, true)).await.unwrap();
    let before_root = snapshot(root.path());
    let before_vms = c.list_vms().await.unwrap();

    let long = "a".repeat(64);
    let mut names: Vec<&str> = BAD_NAMES.to_vec();
    names.push(&long);
    let create =
        serde_json::json!({"disks": [{"name": "disk0", "sizeBytes": 1048576}], "power": "Running"});
    let dead_peer = format!("http://127.0.0.1:{}", common_agent::free_port());
    let enable = |op: &str| {
        serde_json::json!({"operationId": op, "peerSite": "secondary", "peerUrl": dead_peer,
            "peerToken": "t", "intervalSeconds": 30, "recoveryPointRetentionHours": 1,
            "appConsistentFrequencyHours": 0, "mode": "Initial"})
    };
    let begin = serde_json::json!({"sourceSite": "secondary", "cycleId": "c1-00",
        "disks": [{"name": "disk0", "sizeBytes": 1048576}], "integrationServices": true,
        "retentionHours": 1, "bulk": true});
    let commit = serde_json::json!({"cycleId": "c1-00", "bulk": true, "time": "2026-01-01T00:00:00Z", "kind": "CrashConsistent"});
    let op = |id: &str| serde_json::json!({"operationId": id});
    // (method, path with {vm} {disk} {cycle} {index}, body)
    let routes: Vec<(&str, &str, serde_json::Value)> = vec![
        ("GET", "/v1/vms/{vm}", serde_json::Value::Null),
        ("PUT", "/v1/vms/{vm}", create.clone()),
        (
            "DELETE",
            "/v1/vms/{vm}?operationId=del-1",
            serde_json::Value::Null,
        ),
        (
            "POST",
            "/v1/vms/{vm}/power",
            serde_json::json!({"action": "PowerOff", "operationId": "pw-1"}),
        ),
        (
            "PUT",
            "/v1/vms/{vm}/disks/{disk}/data?offset=0",
            serde_json::Value::Null,
        ),
        (
            "GET",
            "/v1/vms/{vm}/disks/{disk}/data?offset=0&length=10",
            serde_json::Value::Null,
        ),
        (
            "GET",
            "/v1/vms/{vm}/disks/{disk}/digest",
            serde_json::Value::Null,
        ),
        (
            "GET",
            "/v1/vms/{vm}/recovery-points",
            serde_json::Value::Null,
        ),
        ("POST", "/v1/vms/{vm}/replication/enable", enable("en-1")),
        (
            "POST",
            "/v1/vms/{vm}/replication/accept",
            serde_json::json!({"operationId": "ac-1", "sourceSite": "secondary"}),
        ),
        (
            "POST",
            "/v1/vms/{vm}/replication/settings",
            serde_json::json!({"operationId": "se-1", "intervalSeconds": 30, "recoveryPointRetentionHours": 1, "appConsistentFrequencyHours": 0}),
        ),
        ("POST", "/v1/vms/{vm}/replication/sync", op("sy-1")),
        ("POST", "/v1/vms/{vm}/replication/stop", op("st-1")),
        (
            "POST",
            "/v1/vms/{vm}/failover",
            serde_json::json!({"operationId": "fo-1", "recoveryPoint": "Latest"}),
        ),
        (
            "POST",
            "/v1/vms/{vm}/test-failover",
            serde_json::json!({"operationId": "tf-1", "recoveryPoint": "Latest", "network": "n"}),
        ),
        ("POST", "/v1/vms/{vm}/test-failover/cleanup", op("tc-1")),
        ("POST", "/v1/vms/{vm}/commit", op("cm-1")),
        ("POST", "/v1/replica/{vm}/begin", begin.clone()),
        (
            "GET",
            "/v1/replica/{vm}/disks/{index}/hashes",
            serde_json::Value::Null,
        ),
        ("GET", "/v1/replica/{vm}/dirty", serde_json::Value::Null),
        (
            "PUT",
            "/v1/replica/{vm}/cycles/{cycle}/blocks?bulk=true",
            serde_json::Value::Null,
        ),
        ("POST", "/v1/replica/{vm}/commit", commit.clone()),
    ];
    let body_of = |v: &serde_json::Value| {
        if v.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(v).unwrap()
        }
    };
    let fill = |path: &str, vm: &str, disk: &str, cycle: &str, index: &str| {
        path.replace("{vm}", vm)
            .replace("{disk}", disk)
            .replace("{cycle}", cycle)
            .replace("{index}", index)
    };
    let long_cycle = "c".repeat(101);
    // Every case runs; the failures are reported together at the end.
    let mut failures = Vec::new();
    let mut checked = 0;
    for (method, path, body) in &routes {
        let mut cases: Vec<(&str, String)> = names
            .iter()
            .map(|n| ("{vm}", fill(path, n, "disk0", "c1-00", "0")))
            .collect();
        if path.contains("{disk}") {
            cases.extend(
                names
                    .iter()
                    .map(|n| ("{disk}", fill(path, "vm1", n, "c1-00", "0"))),
            );
        }
        if path.contains("{cycle}") {
            // Cycle ids may be longer than names: up to 100 characters.
            cases.extend(
                BAD_NAMES
                    .iter()
                    .chain([&long_cycle.as_str()])
                    .map(|n| ("{cycle}", fill(path, "vm1", "disk0", n, "0"))),
            );
        }
        if path.contains("{index}") {
            for n in ["x", "-1", "99999999999999999999", "1", "%2e%2e"] {
                cases.push(("{index}", fill(path, "vm1", "disk0", "c1-00", n)));
            }
        }
        for (param, p) in cases {
            let (status, answer) = raw(agent.port, method, &p, TOKEN, body_of(body)).await;
            let msg = answer["error"].as_str().unwrap_or_default();
            if status != 400 || !msg.contains(param) {
                failures.push(format!(
                    "{method} {p}: {status} {answer} (want 400 naming {param})"
                ));
            }
            checked += 1;
        }
    }
    assert!(checked > 200, "{checked} cases");

    // Operation ids: 1 to 512 bytes, on every route that takes one.
    let big = "o".repeat(513);
    let en_big = enable(&big);
    let op_cases: Vec<(&str, String, serde_json::Value)> = vec![
        (
            "DELETE",
            format!("/v1/vms/vm1?operationId={big}"),
            serde_json::Value::Null,
        ),
        (
            "DELETE",
            "/v1/vms/vm1?operationId=".to_string(),
            serde_json::Value::Null,
        ),
        (
            "POST",
            "/v1/vms/vm1/power".into(),
            serde_json::json!({"action": "Start", "operationId": big}),
        ),
        (
            "POST",
            "/v1/vms/vm1/power".into(),
            serde_json::json!({"action": "Start", "operationId": ""}),
        ),
        ("POST", "/v1/vms/vm1/replication/enable".into(), en_big),
        (
            "POST",
            "/v1/vms/vm1/replication/accept".into(),
            serde_json::json!({"operationId": big, "sourceSite": "secondary"}),
        ),
        (
            "POST",
            "/v1/vms/vm1/replication/settings".into(),
            serde_json::json!({"operationId": big, "intervalSeconds": 30, "recoveryPointRetentionHours": 1, "appConsistentFrequencyHours": 0}),
        ),
        ("POST", "/v1/vms/vm1/replication/sync".into(), op(&big)),
        ("POST", "/v1/vms/vm1/replication/stop".into(), op(&big)),
        (
            "POST",
            "/v1/vms/vm1/failover".into(),
            serde_json::json!({"operationId": big, "recoveryPoint": "Latest"}),
        ),
        (
            "POST",
            "/v1/vms/vm1/test-failover".into(),
            serde_json::json!({"operationId": big, "recoveryPoint": "Latest", "network": "n"}),
        ),
        ("POST", "/v1/vms/vm1/test-failover/cleanup".into(), op(&big)),
        ("POST", "/v1/vms/vm1/commit".into(), op(&big)),
        ("POST", "/v1/vms/vm1/commit".into(), op("")),
        (
            "POST",
            "/v1/cuts".into(),
            serde_json::json!({"cutId": big, "vms": ["vm1"]}),
        ),
    ];
    // Numbers out of range, names and ids in bodies.
    let mut number_cases: Vec<(&str, String, serde_json::Value)> = Vec::new();
    for (field, value) in [
        ("intervalSeconds", serde_json::json!(0)),
        ("intervalSeconds", serde_json::json!(7 * 86400 + 1)),
        ("intervalSeconds", serde_json::json!(u64::MAX)),
        (
            "recoveryPointRetentionHours",
            serde_json::json!(24 * 365 + 1),
        ),
        ("recoveryPointRetentionHours", serde_json::json!(u64::MAX)),
        (
            "appConsistentFrequencyHours",
            serde_json::json!(24 * 365 + 1),
        ),
        ("appConsistentFrequencyHours", serde_json::json!(u64::MAX)),
        ("peerSite", serde_json::json!("")),
    ] {
        let mut b = enable("en-2");
        b[field] = value;
        number_cases.push(("POST", "/v1/vms/vm1/replication/enable".into(), b));
    }
    for (field, value) in [
        ("retentionHours", serde_json::json!(24 * 365 + 1)),
        ("retentionHours", serde_json::json!(u64::MAX)),
        ("disks", serde_json::json!([])),
        (
            "disks",
            serde_json::json!([{"name": "disk0", "sizeBytes": 0}]),
        ),
        (
            "disks",
            serde_json::json!([{"name": "disk0", "sizeBytes": 2u64 << 30}]),
        ),
        (
            "disks",
            serde_json::json!([{"name": "..", "sizeBytes": 1048576}]),
        ),
        (
            "disks",
            serde_json::json!([{"name": "a/b", "sizeBytes": 1048576}]),
        ),
        (
            "disks",
            serde_json::json!([{"name": "d", "sizeBytes": 1048576}, {"name": "d", "sizeBytes": 1048576}]),
        ),
        ("cycleId", serde_json::json!("c".repeat(101))),
        ("cycleId", serde_json::json!("../x")),
        ("parent", serde_json::json!("../x")),
        ("inDoubt", serde_json::json!("c".repeat(101))),
        ("sourceSite", serde_json::json!("")),
    ] {
        let mut b = begin.clone();
        b[field] = value;
        number_cases.push(("POST", "/v1/replica/newvm/begin".into(), b));
    }
    for (field, value) in [
        ("cycleId", serde_json::json!("../x")),
        ("cutId", serde_json::json!(big)),
    ] {
        let mut b = commit.clone();
        b[field] = value;
        number_cases.push(("POST", "/v1/replica/vm1/commit".into(), b));
    }
    number_cases.push((
        "POST",
        "/v1/vms/vm1/test-failover".into(),
        serde_json::json!({"operationId": "tf-2", "recoveryPoint": "Latest", "network": "n".repeat(254)}),
    ));
    number_cases.push((
        "POST",
        "/v1/cuts".into(),
        serde_json::json!({"cutId": "cut-1", "vms": [".."]}),
    ));
    for (method, path, body) in op_cases.iter().chain(&number_cases) {
        let (status, answer) = raw(agent.port, method, path, TOKEN, body_of(body)).await;
        if status != 400 || !answer["error"].is_string() {
            let body = body.to_string();
            let body = &body[..body.len().min(200)];
            failures.push(format!("{method} {path:.80} {body}: {status} {answer}"));
        }
    }

    // A VM whose drill copy name would pass 63 characters: refused with the reason.
    let (status, answer) = raw(
        agent.port,
        "POST",
        &format!("/v1/vms/{long_vm}/test-failover"),
        TOKEN,
        body_of(
            &serde_json::json!({"operationId": "tf-3", "recoveryPoint": "Latest", "network": "n"}),
        ),
    )
    .await;
    if status != 400
        || !answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("-test")
    {
        failures.push(format!("drill of {long_vm}: {status} {answer}"));
    }

    // JSON bodies are limited to 1 MiB (valid JSON, padded beyond it): refused, not applied.
    let pad = "p".repeat(MIB as usize + 1024);
    for (method, path, mut body) in [
        ("PUT", "/v1/vms/vm9", create.clone()),
        (
            "POST",
            "/v1/vms/vm1/power",
            serde_json::json!({"action": "PowerOff", "operationId": "pw-9"}),
        ),
        ("POST", "/v1/replica/vm8/begin", begin.clone()),
        ("POST", "/v1/vms/vm1/replication/enable", enable("en-9")),
    ] {
        body["pad"] = pad.clone().into();
        let (status, answer) = raw(agent.port, method, path, TOKEN, body_of(&body)).await;
        if status != 413 {
            failures.push(format!(
                "{method} {path} with a body over 1 MiB: {status} {answer}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Nothing changed: the same files with the same contents under the test's root (so no
    // file appeared outside the data dir either), the same VMs.
    assert_eq!(snapshot(root.path()), before_root);
    let after_vms = c.list_vms().await.unwrap();
    assert_eq!(
        serde_json::to_value(&after_vms).unwrap(),
        serde_json::to_value(&before_vms).unwrap()
    );
}

const PEER_TOKEN: &str = "peer-token-5678";
/// A peer token of another site.
const OTHER_TOKEN: &str = "other-token-9999";

/// Starts an agent that also takes `PEER_TOKEN` (of site "primary") and `OTHER_TOKEN` (of site
/// "other"), for the agent-to-agent routes only.
fn start_with_peer_token(site: &str, root: &std::path::Path) -> AgentProc {
    let file = root.join(format!("{site}.peer-token"));
    std::fs::write(
        &file,
        format!("# site token\nprimary {PEER_TOKEN}\n\nother {OTHER_TOKEN}\n"),
    )
    .unwrap();
    AgentProc::start_with(
        site,
        root,
        &[],
        &["--peer-token-file", file.to_str().unwrap()],
    )
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_peer_token_reaches_only_the_replica_routes() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = start_with_peer_token("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    cb.create_vm("local", &spec(MIB, true)).await.unwrap();
    let before_root = snapshot(&b.data_dir);

    // The peer token on every route that is not an agent-to-agent one: 403, nothing done.
    let op = |id: &str| serde_json::json!({"operationId": id});
    let enable = serde_json::json!({"operationId": "en-1", "peerSite": "primary", "peerUrl": a.url,
        "peerToken": "t", "intervalSeconds": 30, "mode": "Initial"});
    let controller_routes: Vec<(&str, &str, serde_json::Value)> = vec![
        ("GET", "/v1/vms", serde_json::Value::Null),
        ("GET", "/v1/vms/local", serde_json::Value::Null),
        (
            "PUT",
            "/v1/vms/other",
            serde_json::json!({"disks": [{"name": "disk0", "sizeBytes": 1048576}], "power": "Running"}),
        ),
        (
            "DELETE",
            "/v1/vms/local?operationId=del-1",
            serde_json::Value::Null,
        ),
        (
            "POST",
            "/v1/vms/local/power",
            serde_json::json!({"action": "PowerOff", "operationId": "pw-1"}),
        ),
        (
            "PUT",
            "/v1/vms/local/disks/disk0/data?offset=0",
            serde_json::Value::Null,
        ),
        (
            "GET",
            "/v1/vms/local/disks/disk0/data?offset=0&length=10",
            serde_json::Value::Null,
        ),
        (
            "GET",
            "/v1/vms/local/disks/disk0/digest",
            serde_json::Value::Null,
        ),
        (
            "GET",
            "/v1/vms/local/recovery-points",
            serde_json::Value::Null,
        ),
        ("POST", "/v1/vms/local/replication/enable", enable),
        (
            "POST",
            "/v1/vms/local/replication/accept",
            serde_json::json!({"operationId": "ac-1", "sourceSite": "primary"}),
        ),
        (
            "POST",
            "/v1/vms/local/replication/settings",
            serde_json::json!({"operationId": "se-1", "intervalSeconds": 30, "recoveryPointRetentionHours": 1, "appConsistentFrequencyHours": 0}),
        ),
        ("POST", "/v1/vms/local/replication/sync", op("sy-1")),
        ("POST", "/v1/vms/local/replication/stop", op("st-1")),
        (
            "POST",
            "/v1/vms/local/failover",
            serde_json::json!({"operationId": "fo-1", "recoveryPoint": "Latest"}),
        ),
        (
            "POST",
            "/v1/vms/local/test-failover",
            serde_json::json!({"operationId": "tf-1", "recoveryPoint": "Latest", "network": "n"}),
        ),
        ("POST", "/v1/vms/local/test-failover/cleanup", op("tc-1")),
        ("POST", "/v1/vms/local/commit", op("cm-1")),
        (
            "POST",
            "/v1/cuts",
            serde_json::json!({"cutId": "cut-1", "vms": ["local"]}),
        ),
        ("GET", "/v1/no-such-route", serde_json::Value::Null),
    ];
    for (method, path, body) in &controller_routes {
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        };
        let (status, answer) = raw(b.port, method, path, PEER_TOKEN, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(answer["error"].is_string(), "{method} {path}: {answer}");
    }
    // A token neither kind: 401 on the replica routes too.
    let (status, _) = raw(b.port, "GET", "/v1/replica/local/dirty", "nope", Vec::new()).await;
    assert_eq!(status, 401);
    assert_eq!(snapshot(&b.data_dir), before_root);

    // Replication from A into B with B's peer token.
    ca.create_vm("web-01", &spec(4 * MIB, true)).await.unwrap();
    ca.write_disk("web-01", "disk0", 4096, vec![5u8; 300_000])
        .await
        .unwrap();
    let mut en = common_agent::enable_to("en-1", &b, twinsite::site::ReplicationMode::Initial);
    en.peer_token = PEER_TOKEN.into();
    common_agent::accept_site(&cb, "web-01", "primary").await;
    ca.enable_replication("web-01", &en).await.unwrap();
    ca.sync("web-01", "sync-1").await.unwrap();
    assert_eq!(
        cb.digest("web-01", "disk0").await.unwrap(),
        ca.digest("web-01", "disk0").await.unwrap()
    );
    // The controller token still reaches every route, the replica routes included.
    let (status, answer) = raw(
        b.port,
        "GET",
        "/v1/replica/web-01/disks/0/hashes",
        TOKEN,
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = raw(
        b.port,
        "GET",
        "/v1/replica/web-01/disks/0/hashes",
        PEER_TOKEN,
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");

    // The token of another site reaches none of the replica routes of primary's VM, and cannot
    // claim to be primary.
    let before_b = snapshot(&b.data_dir);
    let begin = |site: &str| {
        serde_json::to_vec(&serde_json::json!({"sourceSite": site, "cycleId": "c1-00",
            "disks": [{"name": "disk0", "sizeBytes": 4 * MIB}], "integrationServices": true,
            "retentionHours": 1, "bulk": true}))
        .unwrap()
    };
    let commit = serde_json::to_vec(&serde_json::json!({"cycleId": "c1-00", "bulk": true,
        "time": "2026-01-01T00:00:00Z", "kind": "CrashConsistent"}))
    .unwrap();
    for (method, path, body, want) in [
        ("POST", "/v1/replica/web-01/begin", begin("primary"), 403),
        ("POST", "/v1/replica/fresh/begin", begin("primary"), 403),
        ("GET", "/v1/replica/web-01/disks/0/hashes", Vec::new(), 403),
        ("GET", "/v1/replica/web-01/dirty", Vec::new(), 403),
        (
            "PUT",
            "/v1/replica/web-01/cycles/c1-00/blocks?bulk=true",
            Vec::new(),
            403,
        ),
        ("POST", "/v1/replica/web-01/commit", commit, 403),
        // As itself it is refused by the replica's own rule: not its replica, not accepted.
        ("POST", "/v1/replica/web-01/begin", begin("other"), 409),
    ] {
        let (status, answer) = raw(b.port, method, path, OTHER_TOKEN, body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
    }
    assert_eq!(snapshot(&b.data_dir), before_b);

    // Peer credentials at rest are readable by the agent's user only.
    let vm_json = a.data_dir.join("vms/web-01/vm.json");
    assert!(
        std::fs::read_to_string(&vm_json)
            .unwrap()
            .contains(PEER_TOKEN)
    );
    assert_eq!(mode(&vm_json), 0o600);
    assert_eq!(mode(&a.data_dir.join("vms")), 0o700);
    assert_eq!(mode(&b.data_dir.join("vms/web-01/vm.json")), 0o600);
    assert_eq!(mode(&b.data_dir.join("vms")), 0o700);

    // A source holding a wrong peer token is refused by the peer: the cycle fails.
    let mut en = common_agent::enable_to("en-2", &b, twinsite::site::ReplicationMode::Resync);
    en.peer_token = "wrong".into();
    ca.enable_replication("web-01", &en).await.unwrap();
    let err = ca.sync("web-01", "sync-2").await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[test]
fn a_peer_token_file_that_is_empty_siteless_or_the_controller_token_stops_the_start() {
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let bound = format!("primary {TOKEN}");
    for (content, want) in [
        ("\n# only a comment\n", "peer token file holds no token"),
        // A token with no site would reach the replicas of every site's VMs.
        ("# a comment\nsome-peer-token-1234", "line 2 names no site"),
        (TOKEN, "names no site"),
        (bound.as_str(), "controller token"),
        ("a b c", "line 1"),
    ] {
        let peer = root.path().join("peer");
        std::fs::write(&peer, content).unwrap();
        let log = root.path().join("stderr");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_twinsite"))
            .args(["agent", "--site", "s", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(root.path().join("data"))
            .arg("--token-file")
            .arg(&token)
            .arg("--peer-token-file")
            .arg(&peer)
            .arg("--insecure-http")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // An agent that takes the file serves until it is stopped: not waited for forever.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "the agent started with {content:?}: {err}"
        );
        assert!(err.contains(want), "{content:?}: {err}");
    }
}

/// `POST /v1/vms/{vm}/replication/settings` on a running replication: bad numbers are refused
/// with a 400 and change nothing; good ones are listed at once, start no bulk transfer and keep
/// the replica's points; the cycle loop runs at the new interval (a cycle comes on its own, which
/// the old 900 s interval would not bring during the test), and the retention reaches the
/// replica with the next cycle, where it drops what the new retention drops and nothing else.
#[tokio::test]
async fn replication_settings_change_on_a_running_replication_without_a_new_copy() {
    use twinsite::site::{ReplicationMode, ReplicationSettingsRequest, ReplicationState};
    let root = tempfile::tempdir().unwrap();
    let mut a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let vm = "web-01";
    ca.create_vm(vm, &spec(4 * MIB, true)).await.unwrap();
    ca.write_disk(vm, "disk0", 0, vec![1u8; 100]).await.unwrap();
    // 900 s between cycles, 24 h of points.
    common_agent::accept_site(&cb, vm, "primary").await;
    ca.enable_replication(
        vm,
        &common_agent::enable_to("en-1", &b, ReplicationMode::Initial),
    )
    .await
    .unwrap();
    ca.sync(vm, "sync-1").await.unwrap();
    ca.write_disk(vm, "disk0", 0, vec![2u8; 100]).await.unwrap();
    ca.sync(vm, "sync-2").await.unwrap();
    let before = point_ids(&cb, vm).await;
    // The initial copy's point and the two cycles'.
    assert_eq!(before.len(), 3, "{before:?}");
    let listed = ca.get_vm(vm).await.unwrap().replication;
    assert_eq!(
        (
            listed.interval_seconds,
            listed.recovery_point_retention_hours,
            listed.app_consistent_frequency_hours
        ),
        (900, Some(24), Some(0))
    );
    let replica = cb.get_vm(vm).await.unwrap().replication;
    assert_eq!(replica.recovery_point_retention_hours, Some(24));

    let http = reqwest::Client::new();
    let url = format!("{}/v1/vms/{vm}/replication/settings", a.url);
    let ok = serde_json::json!({"operationId": "set-bad", "intervalSeconds": 30,
        "recoveryPointRetentionHours": 2, "appConsistentFrequencyHours": 1});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = ok.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let cases = [
        (
            "interval 0",
            with("intervalSeconds", 0.into()),
            "intervalSeconds",
        ),
        (
            "interval over a week",
            with("intervalSeconds", 604_801.into()),
            "intervalSeconds",
        ),
        (
            "negative interval",
            with("intervalSeconds", (-30).into()),
            "intervalSeconds",
        ),
        (
            "interval as text",
            with("intervalSeconds", "30".into()),
            "intervalSeconds",
        ),
        (
            "retention over a year",
            with("recoveryPointRetentionHours", 8761.into()),
            "recoveryPointRetentionHours",
        ),
        (
            "app-consistent over a year",
            with("appConsistentFrequencyHours", 8761.into()),
            "appConsistentFrequencyHours",
        ),
        (
            "no retention",
            without("recoveryPointRetentionHours"),
            "recoveryPointRetentionHours",
        ),
        ("no operation id", without("operationId"), "operationId"),
        (
            "empty operation id",
            with("operationId", "".into()),
            "operationId",
        ),
    ];
    for (name, body, field) in cases {
        let resp = http
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let err: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, 400, "{name}: {err}");
        let reason = err["error"].as_str().unwrap_or_default();
        assert!(reason.contains(field), "{name}: {err}");
    }
    // A replica's settings are its source's; an unknown VM is not found.
    let good = ReplicationSettingsRequest {
        operation_id: "set-1".into(),
        interval_seconds: 30,
        recovery_point_retention_hours: 2,
        app_consistent_frequency_hours: 1,
    };
    assert!(matches!(
        cb.update_replication_settings(vm, &good).await,
        Err(SiteError::Conflict(_))
    ));
    assert!(matches!(
        ca.update_replication_settings("ghost", &good).await,
        Err(SiteError::NotFound(_))
    ));
    // Nothing was applied.
    assert_eq!(ca.get_vm(vm).await.unwrap().replication, listed);

    let sent_before = listed.bytes_sent;
    let info = ca.update_replication_settings(vm, &good).await.unwrap();
    assert_eq!(info.state, ReplicationState::Replicating);
    assert_eq!(
        (
            info.interval_seconds,
            info.recovery_point_retention_hours,
            info.app_consistent_frequency_hours
        ),
        (30, Some(2), Some(1))
    );
    // The same operation id with other numbers is answered from the record: nothing changes.
    let again = ca
        .update_replication_settings(
            vm,
            &ReplicationSettingsRequest {
                interval_seconds: 300,
                recovery_point_retention_hours: 5,
                ..good.clone()
            },
        )
        .await
        .unwrap();
    assert_eq!(again, info);
    let now = ca.get_vm(vm).await.unwrap().replication;
    assert_eq!(
        (now.interval_seconds, now.recovery_point_retention_hours),
        (30, Some(2))
    );
    // No bulk transfer, and the replica's points are all there.
    assert_eq!(now.state, ReplicationState::Replicating);
    assert_eq!(point_ids(&cb, vm).await, before);

    // The cycle loop takes the new interval: a cycle comes on its own.
    ca.write_disk(vm, "disk0", 0, vec![3u8; 100]).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let after = loop {
        let p = point_ids(&cb, vm).await;
        if p.len() > before.len() {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cycle at the new interval: {p:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(after[..before.len()], before[..], "points kept");
    let replica = cb.get_vm(vm).await.unwrap().replication;
    assert_eq!(replica.recovery_point_retention_hours, Some(2));
    // Incremental cycles only: a few blocks, not the disk again.
    let sent = ca.get_vm(vm).await.unwrap().replication.bytes_sent - sent_before;
    assert!(sent < MIB, "sent {sent} bytes after the settings change");
    assert_eq!(
        ca.digest(vm, "disk0").await.unwrap(),
        cb.digest(vm, "disk0").await.unwrap()
    );

    // The cycle at the new settings was the first app-consistent one (hourly now).
    let rps = cb.recovery_points(vm).await.unwrap();
    let app_point = rps.last().unwrap().clone();
    assert!(app_point.app_consistent, "{rps:?}");
    // A retention of 0 keeps only the newest point and the newest app-consistent one: the
    // replica applies it at the next cycle.
    ca.update_replication_settings(
        vm,
        &ReplicationSettingsRequest {
            operation_id: "set-2".into(),
            recovery_point_retention_hours: 0,
            app_consistent_frequency_hours: 0,
            ..good.clone()
        },
    )
    .await
    .unwrap();
    let newest = ca.sync(vm, "sync-3").await.unwrap().recovery_point;
    assert_eq!(point_ids(&cb, vm).await, vec![app_point.id, newest.id]);
    assert_eq!(
        cb.get_vm(vm)
            .await
            .unwrap()
            .replication
            .recovery_point_retention_hours,
        Some(0)
    );
    // The settings survive a restart of the source agent.
    a.kill_and_restart();
    let r = a.client().get_vm(vm).await.unwrap().replication;
    assert_eq!(
        (r.interval_seconds, r.recovery_point_retention_hours),
        (30, Some(0))
    );
}

async fn point_ids(c: &twinsite::site::AgentClient, vm: &str) -> Vec<String> {
    c.recovery_points(vm)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

/// A peer's `begin` whose libvirt domain definition holds anything outside the allowlist (a
/// host file, device or socket, another NIC type, firmware and NVRAM paths, a loosened
/// security label, a console on every address, a kernel outside `--boot-file-dir`) is refused
/// with a 400 naming it, and nothing is stored: no replica, no file changed. The same `begin`
/// with the plain definition is taken.
#[tokio::test]
async fn a_begin_with_a_hostile_domain_definition_is_refused_and_stores_nothing() {
    let root = tempfile::tempdir().unwrap();
    let boot = tempfile::tempdir().unwrap();
    std::fs::write(boot.path().join("vmlinuz"), b"kernel").unwrap();
    let boot_dir = boot.path().to_string_lossy().to_string();
    let b = AgentProc::start_with("dr", root.path(), &[], &["--boot-file-dir", &boot_dir]);
    let cb = b.client();
    cb.accept_replication(
        "web",
        &twinsite::site::AcceptReplication {
            operation_id: "acc-1".into(),
            source_site: "primary".into(),
        },
    )
    .await
    .unwrap();
    let definition = |devices: &str, os: &str| {
        format!(
            "<domain type='qemu'><name>web</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{boot_dir}/vmlinuz</kernel>\
             {os}</os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/src/web.qcow2'/><target dev='disk0' bus='virtio'/></disk>\
             <serial type='file'><source path='/src/console.log'/></serial>{devices}</devices>\
             </domain>"
        )
    };
    let begin = |definition: String| {
        serde_json::to_vec(
            &serde_json::json!({"sourceSite": "primary", "cycleId": "c1-00",
            "disks": [{"name": "disk0", "sizeBytes": MIB}], "integrationServices": false,
            "retentionHours": 1, "bulk": true, "definition": definition}),
        )
        .unwrap()
    };
    let before = snapshot(root.path());
    let hostile = [
        (
            definition(
                "<disk device='disk'><source file='/etc/shadow'/><target dev='disk1'/></disk>",
                "",
            ),
            "type attribute is missing",
        ),
        (
            definition(
                "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='disk1'/></disk>",
                "",
            ),
            "type 'volume'",
        ),
        (
            definition(
                "<disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='disk1'/></disk>",
                "",
            ),
            "type 'network'",
        ),
        (
            definition("", "").replace(
                "<source file='/src/web.qcow2'/>",
                "<source file='/src/web.qcow2'/><backingStore type='file'><source file='/etc/shadow'/></backingStore>",
            ),
            "<backingStore>",
        ),
        (
            definition("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>", ""),
            "<interface type='direct'>",
        ),
        (
            definition("<interface type='hostdev'><source><address type='pci' bus='1'/></source></interface>", ""),
            "<interface type='hostdev'>",
        ),
        (
            definition("<console type='tcp'><source mode='bind' host='0.0.0.0' service='2445'/></console>", ""),
            "type='tcp'",
        ),
        (
            definition("<parallel type='file'><source path='/etc/cron.d/x'/></parallel>", ""),
            "<parallel>",
        ),
        (definition("", "<loader type='pflash'>/etc/evil.fd</loader>"), "<loader>"),
        (definition("", "<nvram>/etc/shadow</nvram>"), "<nvram>"),
        (
            definition("<memory model='nvdimm'><source><path>/dev/pmem0</path></source></memory>", ""),
            "<memory>",
        ),
        (
            definition("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>", ""),
            "passthrough",
        ),
        (
            definition("<input type='evdev'><source dev='/dev/input/event0'/></input>", ""),
            "evdev",
        ),
        (
            definition("<graphics type='vnc' listen='0.0.0.0'/>", ""),
            "0.0.0.0",
        ),
        (
            definition("", "").replace("</devices>", "</devices><seclabel type='none'/>"),
            "<seclabel type='none'>",
        ),
        (
            definition("", "").replace(
                "</devices>",
                "</devices><seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>",
            ),
            "<seclabel type='static'>",
        ),
        (
            definition("<hostdev mode='subsystem' type='pci'/>", ""),
            "<hostdev>",
        ),
        (
            definition("", "").replace(&format!("{boot_dir}/vmlinuz"), "/etc/passwd"),
            "<os><kernel>",
        ),
    ];
    for (def, says) in hostile {
        let (status, answer) =
            raw(b.port, "POST", "/v1/replica/web/begin", TOKEN, begin(def)).await;
        assert_eq!(status, 400, "{says}: {answer}");
        let why = answer["error"].as_str().unwrap_or_default();
        assert!(why.contains(says), "{why:?} does not name {says:?}");
    }
    assert_eq!(
        snapshot(root.path()),
        before,
        "a refused begin stored nothing"
    );
    assert!(
        cb.list_vms()
            .await
            .unwrap()
            .vms
            .iter()
            .all(|v| v.name != "web")
    );

    let (status, answer) = raw(
        b.port,
        "POST",
        "/v1/replica/web/begin",
        TOKEN,
        begin(definition("", "")),
    )
    .await;
    assert_eq!(status, 200, "the plain definition is taken: {answer}");
    assert!(
        cb.list_vms()
            .await
            .unwrap()
            .vms
            .iter()
            .any(|v| v.name == "web")
    );
}

/// A replica `web` of site `primary` at an agent started with `args`: accepted, its bulk
/// transfer `c0` committed (no blocks: the disk stays zeros), so incremental cycles follow.
async fn replica_of_primary(root: &std::path::Path, disks: u64, args: &[&str]) -> AgentProc {
    let b = AgentProc::start_with("dr", root, &[], args);
    b.client()
        .accept_replication(
            "web",
            &twinsite::site::AcceptReplication {
                operation_id: "acc-1".into(),
                source_site: "primary".into(),
            },
        )
        .await
        .unwrap();
    let (status, answer) = post(
        b.port,
        "/v1/replica/web/begin",
        begin_body("c0", None, disks),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post(
        b.port,
        "/v1/replica/web/commit",
        commit_body("c0", true, "2026-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    b
}

async fn post(port: u16, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    raw(
        port,
        "POST",
        path,
        TOKEN,
        serde_json::to_vec(&body).unwrap(),
    )
    .await
}

/// A `begin` of `disks` disks of 1 MiB: bulk without a parent, else incremental on `parent`.
fn begin_body(cycle: &str, parent: Option<&str>, disks: u64) -> serde_json::Value {
    let disks: Vec<_> = (0..disks)
        .map(|i| serde_json::json!({"name": format!("disk{i}"), "sizeBytes": MIB}))
        .collect();
    serde_json::json!({"sourceSite": "primary", "cycleId": cycle, "disks": disks,
        "integrationServices": false, "retentionHours": 24, "bulk": parent.is_none(),
        "parent": parent})
}

fn commit_body(cycle: &str, bulk: bool, time: &str) -> serde_json::Value {
    serde_json::json!({"cycleId": cycle, "bulk": bulk, "time": time, "kind": "AppConsistent"})
}

/// `--max-disks-per-vm`: a `begin` with more disks is refused (400 naming `disks`) and makes
/// no replica; as many is taken.
#[tokio::test]
async fn a_begin_with_more_disks_than_allowed_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let b = AgentProc::start_with("dr", root.path(), &[], &["--max-disks-per-vm", "2"]);
    let before = snapshot(root.path());
    let (status, answer) = post(b.port, "/v1/replica/web/begin", begin_body("c0", None, 3)).await;
    assert_eq!(status, 400, "{answer}");
    let why = answer["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("disks") && why.contains("--max-disks-per-vm"),
        "{why}"
    );
    assert_eq!(snapshot(root.path()), before);
    b.client()
        .accept_replication(
            "web",
            &twinsite::site::AcceptReplication {
                operation_id: "acc-1".into(),
                source_site: "primary".into(),
            },
        )
        .await
        .unwrap();
    let (status, answer) = post(b.port, "/v1/replica/web/begin", begin_body("c0", None, 2)).await;
    assert_eq!(status, 200, "{answer}");
}

/// A cycle stages at most twice its VM's disks: the batch that would go past is refused
/// (413) and not staged; the cycle still commits what it staged before.
#[tokio::test]
async fn a_cycle_that_stages_more_than_twice_its_disks_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let b = replica_of_primary(root.path(), 1, &[]).await;
    let (status, answer) = post(
        b.port,
        "/v1/replica/web/begin",
        begin_body("c1", Some("c0"), 1),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // The disk's 16 blocks, all ones: 1 MiB and a little per batch.
    let mut batch = Vec::new();
    for block in 0..16 {
        twinsite::replication::frame::push(&mut batch, 0, block, &[1u8; 64 << 10]);
    }
    let staging = b.data_dir.join("vms/web/staging");
    let staged = || -> u64 {
        std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let path = "/v1/replica/web/cycles/c1/blocks";
    for _ in 0..2 {
        let (status, answer) = raw(b.port, "PUT", path, TOKEN, batch.clone()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let at_limit = staged();
    let (status, answer) = raw(b.port, "PUT", path, TOKEN, batch.clone()).await;
    assert_eq!(status, 413, "{answer}");
    let why = answer["error"].as_str().unwrap_or_default();
    assert!(why.contains("staging"), "{why}");
    assert_eq!(staged(), at_limit, "the refused batch was not staged");
    let (status, answer) = post(
        b.port,
        "/v1/replica/web/commit",
        commit_body("c1", false, "2026-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let data = b.client().read_disk("web", "disk0", 0, 8).await.unwrap();
    assert_eq!(data, [1u8; 8]);
}

/// `--max-points-per-vm`: a commit whose point would leave more points after retention is
/// refused (409 naming the recovery points) and records nothing; a commit time beyond this
/// site's clock and the skew allowance is refused (400 naming `time`) and records nothing.
#[tokio::test]
async fn commits_over_the_point_limit_or_from_the_future_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let b = replica_of_primary(root.path(), 1, &["--max-points-per-vm", "2"]).await;
    let c = b.client();
    let now = jiff::Timestamp::now();
    let at = |secs: i64| (now + jiff::SignedDuration::from_secs(secs)).to_string();
    let mut parent = "c0".to_string();
    for (n, secs) in [(1, -300), (2, -200)] {
        let cycle = format!("c{n}");
        let (status, answer) = post(
            b.port,
            "/v1/replica/web/begin",
            begin_body(&cycle, Some(&parent), 1),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let (status, answer) = post(
            b.port,
            "/v1/replica/web/commit",
            commit_body(&cycle, false, &at(secs)),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        parent = cycle;
    }
    let (status, answer) = post(
        b.port,
        "/v1/replica/web/begin",
        begin_body("c3", Some("c2"), 1),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let points = point_ids(&c, "web").await;
    assert_eq!(points.len(), 2);
    let before = snapshot(root.path());

    // A time an hour ahead: refused, naming the field.
    let (status, answer) = post(
        b.port,
        "/v1/replica/web/commit",
        commit_body("c3", false, &at(3600)),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let why = answer["error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("time ") && why.contains("--max-clock-skew-seconds"),
        "{why}"
    );
    assert_eq!(snapshot(root.path()), before);

    // A third point (app-consistent points of the last hour are all kept): refused.
    let (status, answer) = post(
        b.port,
        "/v1/replica/web/commit",
        commit_body("c3", false, &at(-100)),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    let why = answer["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("recovery points") && why.contains("--max-points-per-vm"),
        "{why}"
    );
    assert_eq!(snapshot(root.path()), before);
    assert_eq!(point_ids(&c, "web").await, points);
}

fn bulk_begin_body(site: &str, size: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"sourceSite": site, "cycleId": "c1-00",
        "disks": [{"name": "disk0", "sizeBytes": size}], "integrationServices": true,
        "retentionHours": 1, "bulk": true}))
    .unwrap()
}

/// A peer creates no VM here on its own: a bulk `begin` for a VM that is not here is refused
/// until the controller accepts that source for it, and then only from that source.
#[tokio::test]
async fn a_begin_for_a_vm_that_was_never_accepted_is_refused_and_creates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut b = start_with_peer_token("secondary", root.path());
    let cb = b.client();
    let before = snapshot(&b.data_dir);
    let (status, answer) = raw(
        b.port,
        "POST",
        "/v1/replica/fresh/begin",
        PEER_TOKEN,
        bulk_begin_body("primary", MIB),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("controller"),
        "{answer}"
    );
    assert!(cb.list_vms().await.unwrap().vms.is_empty());
    assert_eq!(snapshot(&b.data_dir), before);

    // Accepted for another source: still refused for this one.
    common_agent::accept_site(&cb, "fresh", "other").await;
    let (status, answer) = raw(
        b.port,
        "POST",
        "/v1/replica/fresh/begin",
        PEER_TOKEN,
        bulk_begin_body("primary", MIB),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(cb.list_vms().await.unwrap().vms.is_empty());

    // Accepted for it: the first bulk transfer creates the replica, once.
    common_agent::accept_site(&cb, "fresh", "primary").await;
    let (status, answer) = raw(
        b.port,
        "POST",
        "/v1/replica/fresh/begin",
        PEER_TOKEN,
        bulk_begin_body("primary", MIB),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let vm = cb.get_vm("fresh").await.unwrap();
    assert_eq!(vm.role, Role::Replica);
    // Lost here (its files gone while the agent was down), the replica is created again by
    // the source's next bulk transfer: the controller still means it to be one.
    b.kill();
    std::fs::remove_dir_all(b.data_dir.join("vms/fresh")).unwrap();
    b.spawn();
    let cb = b.client();
    let (status, answer) = raw(
        b.port,
        "POST",
        "/v1/replica/fresh/begin",
        PEER_TOKEN,
        bulk_begin_body("primary", MIB),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Deleted by the controller, it is not: the grant goes with it.
    cb.delete_vm("fresh", "del-1").await.unwrap();
    let (status, answer) = raw(
        b.port,
        "POST",
        "/v1/replica/fresh/begin",
        PEER_TOKEN,
        bulk_begin_body("primary", MIB),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(cb.list_vms().await.unwrap().vms.is_empty());
}

/// `PUT /v1/peer-credentials/{site}`: the controller installs the credential a peer site
/// presents here. It reaches only the replica routes of that site's VMs; a new one replaces
/// it (the old one is refused at once, after a restart too); only a digest is on disk; the
/// outbound credential replaces the peer token of the VMs replicating to that site.
#[tokio::test]
async fn installed_peer_credentials_are_bound_to_their_site_and_rotate() {
    use twinsite::site::{PeerCredentials, ReplicationMode};
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    const FIRST: &str = "first-pair-credential-0123456789";
    const SECOND: &str = "second-pair-credential-012345678";
    let install = |inbound: Option<&str>, outbound: Option<&str>| PeerCredentials {
        inbound: inbound.map(Into::into),
        outbound: outbound.map(Into::into),
    };

    // Bad requests: 400 naming the field, nothing installed.
    for (site, body, want) in [
        ("primary", serde_json::json!({}), "inbound, outbound"),
        (
            "primary",
            serde_json::json!({"inbound": "short"}),
            "inbound must be",
        ),
        (
            "primary",
            serde_json::json!({"outbound": "with a space in it 0123"}),
            "outbound must be",
        ),
        (
            "secondary",
            serde_json::json!({"inbound": FIRST}),
            "own site",
        ),
    ] {
        let (status, answer) = raw(
            b.port,
            "PUT",
            &format!("/v1/peer-credentials/{site}"),
            TOKEN,
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(want),
            "{body}: {answer}"
        );
    }
    // The controller token is never a peer's.
    let err = cb
        .install_peer_credentials("primary", &install(Some(TOKEN), None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("controller token"), "{err}");

    let r = cb
        .install_peer_credentials("primary", &install(Some(FIRST), None))
        .await
        .unwrap();
    assert!(r.inbound_changed);
    // Again: nothing changes.
    let r = cb
        .install_peer_credentials("primary", &install(Some(FIRST), None))
        .await
        .unwrap();
    assert!(!r.inbound_changed);
    // Only a digest of it is kept.
    let stored = std::fs::read_to_string(b.data_dir.join("peer-credentials.json")).unwrap();
    assert!(!stored.contains(FIRST), "{stored}");
    assert_eq!(mode(&b.data_dir.join("peer-credentials.json")), 0o600);

    // Not on the controller's routes, nor on the route that installs credentials.
    for (method, path) in [("GET", "/v1/vms"), ("PUT", "/v1/peer-credentials/primary")] {
        let body = serde_json::to_vec(&serde_json::json!({"inbound": SECOND})).unwrap();
        let (status, answer) = raw(b.port, method, path, FIRST, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
    }

    // Replication from A into B with the installed credential.
    ca.create_vm("web-01", &spec(MIB, true)).await.unwrap();
    ca.write_disk("web-01", "disk0", 0, vec![7u8; 70_000])
        .await
        .unwrap();
    common_agent::accept_site(&cb, "web-01", "primary").await;
    let mut en = common_agent::enable_to("en-1", &b, ReplicationMode::Initial);
    en.peer_token = FIRST.into();
    ca.enable_replication("web-01", &en).await.unwrap();
    ca.sync("web-01", "sync-1").await.unwrap();
    let hashes = "/v1/replica/web-01/disks/0/hashes";
    assert_eq!(raw(b.port, "GET", hashes, FIRST, vec![]).await.0, 200);

    // B's own VM does not replicate from primary: none of its replica routes.
    cb.create_vm("local", &spec(MIB, true)).await.unwrap();
    for (method, path, body) in [
        ("GET", "/v1/replica/local/disks/0/hashes", vec![]),
        ("GET", "/v1/replica/local/dirty", vec![]),
        (
            "POST",
            "/v1/replica/local/begin",
            bulk_begin_body("primary", MIB),
        ),
    ] {
        let (status, answer) = raw(b.port, method, path, FIRST, body).await;
        assert!(
            status == 403 || status == 409,
            "{method} {path}: {status} {answer}"
        );
    }

    // Rotation: the new credential at B, then at A (the outbound one of A's VMs to B).
    cb.install_peer_credentials("primary", &install(Some(SECOND), None))
        .await
        .unwrap();
    assert_eq!(raw(b.port, "GET", hashes, FIRST, vec![]).await.0, 401);
    assert_eq!(raw(b.port, "GET", hashes, SECOND, vec![]).await.0, 200);
    let r = ca
        .install_peer_credentials("secondary", &install(None, Some(SECOND)))
        .await
        .unwrap();
    assert_eq!(r.outbound_vms, 1);
    let vm_json = std::fs::read_to_string(a.data_dir.join("vms/web-01/vm.json")).unwrap();
    assert!(vm_json.contains(SECOND) && !vm_json.contains(FIRST));
    ca.write_disk("web-01", "disk0", 0, vec![8u8; 100])
        .await
        .unwrap();
    ca.sync("web-01", "sync-2").await.unwrap();
    assert_eq!(
        cb.digest("web-01", "disk0").await.unwrap(),
        ca.digest("web-01", "disk0").await.unwrap()
    );
    // After a restart B still refuses the old one and takes the new one.
    b.kill_and_restart();
    assert_eq!(raw(b.port, "GET", hashes, FIRST, vec![]).await.0, 401);
    assert_eq!(raw(b.port, "GET", hashes, SECOND, vec![]).await.0, 200);
}

/// `method path` at `base` with the controller's token, as the controller acting for
/// namespace `ns` calls it; the status and the JSON answer.
async fn as_namespace(
    base: &str,
    method: &str,
    path: &str,
    ns: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new()
        .request(m, format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .header("twinsite-namespace", ns);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// A VM belongs to the namespace the controller named when it enabled replication (at the
/// source) or accepted it (at the replica, also for a replica the first transfer creates): a
/// call of another namespace is refused with 409 naming the owner and changes nothing, also
/// after a restart (the owner is in vm.json, written with the enable).
#[tokio::test]
async fn a_vm_refuses_the_calls_of_another_namespace() {
    let root = tempfile::tempdir().unwrap();
    let mut a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    ca.create_vm("web", &spec(MIB, true)).await.unwrap();
    let accept = serde_json::json!({"operationId": "acc-a", "sourceSite": "primary"});
    let (code, body) = as_namespace(
        &b.url,
        "POST",
        "/v1/vms/web/replication/accept",
        "team-a",
        Some(accept),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // Another namespace cannot take over the grant of a VM not there yet.
    let (code, body) = as_namespace(
        &b.url,
        "POST",
        "/v1/vms/web/replication/accept",
        "team-b",
        Some(serde_json::json!({"operationId": "acc-b", "sourceSite": "primary"})),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let enable = serde_json::to_value(common_agent::enable_to(
        "en-a",
        &b,
        twinsite::site::ReplicationMode::Initial,
    ))
    .unwrap();
    let (code, body) = as_namespace(
        &a.url,
        "POST",
        "/v1/vms/web/replication/enable",
        "team-a",
        Some(enable),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    ca.sync("web", "sync-1").await.unwrap();
    let replica = cb.get_vm("web").await.unwrap();
    assert_eq!(replica.role, Role::Replica);

    let refused = |code: u16, body: &serde_json::Value| {
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["reason"], "VMOwnedByOtherNamespace", "{body}");
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains("namespace team-a"), "{msg}");
    };
    for restart in [false, true] {
        if restart {
            a.kill_and_restart();
        }
        let (code, body) = as_namespace(
            &a.url,
            "POST",
            "/v1/vms/web/power",
            "team-b",
            Some(
                serde_json::json!({"action": "PowerOff", "operationId": format!("off-{restart}")}),
            ),
        )
        .await;
        refused(code, &body);
        let (code, body) = as_namespace(
            &a.url,
            "POST",
            "/v1/vms/web/replication/stop",
            "team-b",
            Some(serde_json::json!({"operationId": format!("stop-{restart}")})),
        )
        .await;
        refused(code, &body);
    }
    let (code, body) = as_namespace(
        &b.url,
        "DELETE",
        "/v1/vms/web?operationId=del-b",
        "team-b",
        None,
    )
    .await;
    refused(code, &body);
    let (code, body) = as_namespace(
        &b.url,
        "POST",
        "/v1/vms/web/failover",
        "team-b",
        Some(serde_json::json!({"operationId": "fo-b", "recoveryPoint": "Latest"})),
    )
    .await;
    refused(code, &body);
    // Nothing changed, and the owner shows in the listing.
    let source = ca.get_vm("web").await.unwrap();
    assert_eq!(source.power, Power::Running);
    assert_eq!(
        source.replication.state,
        twinsite::site::ReplicationState::Replicating
    );
    let (code, body) = as_namespace(&b.url, "GET", "/v1/vms/web", "team-a", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["owner"], "team-a", "{body}");
    assert_eq!(body["role"], "Replica", "{body}");
    // The owner's own calls, and calls that name no namespace, go through.
    let (code, body) = as_namespace(
        &a.url,
        "POST",
        "/v1/vms/web/replication/sync",
        "team-a",
        Some(serde_json::json!({"operationId": "sync-2"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

/// The agent's soft limit on open files: read, and set to `cur`.
struct OpenFiles {
    pid: libc::pid_t,
    was: libc::rlimit,
}

impl OpenFiles {
    fn of(agent: &AgentProc) -> Self {
        let pid = agent.child.as_ref().unwrap().id() as libc::pid_t;
        let mut was = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads the limit of a process this test started into `was`.
        assert_eq!(
            unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut was) },
            0
        );
        OpenFiles { pid, was }
    }

    /// Descriptors the agent holds now.
    fn open(&self) -> libc::rlim_t {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap()
            .count() as libc::rlim_t
    }

    fn set(&self, cur: libc::rlim_t) {
        let lim = libc::rlimit {
            rlim_cur: cur,
            rlim_max: self.was.rlim_max,
        };
        // SAFETY: sets the soft limit of a process this test started.
        assert_eq!(
            unsafe { libc::prlimit(self.pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) },
            0
        );
    }

    fn restore(&self) {
        self.set(self.was.rlim_cur);
    }
}

/// An agent out of file descriptors answers 503 naming the cause and what to do, never a bare
/// 500, and serves again once it has descriptors.
#[tokio::test]
async fn an_agent_out_of_open_files_answers_503_saying_so() {
    let root = tempfile::tempdir().unwrap();
    let agent = AgentProc::start("primary", root.path());
    let c = agent.client();
    // The one connection this test uses is open before the limit is lowered.
    c.health().await.unwrap();
    let files = OpenFiles::of(&agent);
    // Not one descriptor to spare: creating a VM opens files.
    files.set(files.open());
    match c.create_vm("vm-0", &spec(MIB, true)).await {
        Err(SiteError::Other(503, m)) if m.contains("too many open files") => {}
        other => panic!("expected a 503 naming the open-file limit, got {other:?}"),
    }
    files.restore();
    c.create_vm("after", &spec(MIB, true)).await.unwrap();
}

/// An agent serves a whole site: a VM nobody is writing to holds no open file, so the number
/// of VMs a site protects is not bounded by the agent's open-file limit, before a restart or
/// after it.
#[tokio::test]
async fn idle_vms_hold_no_open_files() {
    const VMS: usize = 120;
    let root = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start("primary", root.path());
    let c = agent.client();
    c.health().await.unwrap();
    let files = OpenFiles::of(&agent);
    let idle = files.open();
    // Fewer descriptors than VMs: room for the requests in flight, none for idle VMs.
    files.set(idle + 32);
    for i in 0..VMS {
        let vm = format!("vm-{i}");
        c.create_vm(&vm, &spec(MIB, true)).await.unwrap();
        c.write_disk(&vm, "disk0", 70_000, vec![i as u8 + 1; 100])
            .await
            .unwrap();
    }
    for i in 0..VMS {
        let vm = format!("vm-{i}");
        assert_eq!(
            c.read_disk(&vm, "disk0", 70_000, 100).await.unwrap(),
            vec![i as u8 + 1; 100],
            "{vm}"
        );
    }
    assert_eq!(c.list_vms().await.unwrap().vms.len(), VMS);
    files.restore();

    // Loaded at start, the VMs hold no files either.
    agent.kill_and_restart();
    let c = agent.client();
    c.health().await.unwrap();
    let files = OpenFiles::of(&agent);
    let open = files.open();
    assert!(
        open < idle + 16,
        "an agent with {VMS} idle VMs holds {open} descriptors, one with none held {idle}"
    );
    assert_eq!(
        c.read_disk("vm-7", "disk0", 70_000, 100).await.unwrap(),
        vec![8u8; 100]
    );
}
