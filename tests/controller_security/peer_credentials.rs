//! One site can never take over the other: the credential a site's agent holds for its peer is
//! the pair's own, minted by the controller, valid at the peer only on the replica routes of
//! the VMs that replicate from that site, and rotated by deleting its Secret. Real API server,
//! real agents, real controller.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};
use twinsite::site::SiteProvider;

/// Calls `method path` at `base` with `token`; the HTTP status (0 when there is no answer).
async fn call(base: &str, method: &str, path: &str, token: &str, body: Option<Value>) -> u16 {
    answer(base, method, path, token, body).await.0
}

/// Calls `method path` at `base` with `token`; the HTTP status (0 when there is no answer) and
/// the answer's body.
async fn answer(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, String) {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    });
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http.request(m, format!("{base}{path}")).bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&b).unwrap());
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Everything that could be a credential in the files under `dir`: every string of every JSON
/// file and every word of every other text file, 16 characters or more.
fn harvest(dir: &Path) -> BTreeSet<String> {
    fn strings(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::String(s) => {
                out.insert(s.clone());
            }
            Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            Value::Object(o) => o.iter().for_each(|(k, x)| {
                out.insert(k.clone());
                strings(x, out)
            }),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
                continue;
            }
            files += 1;
            let bytes = std::fs::read(e.path()).unwrap();
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                strings(&v, &mut out);
            } else if let Ok(text) = std::str::from_utf8(&bytes) {
                out.extend(text.split_whitespace().map(str::to_string));
            }
        }
    }
    assert!(files > 3, "nothing read under {}", dir.display());
    // A bearer token is one word of visible ASCII: nothing else can be presented.
    out.retain(|s| s.len() >= 16 && s.bytes().all(|b| b.is_ascii_graphic()));
    out
}

/// What site B shows of its VMs that an attacker would change: names, power, role, direction
/// and peer of replication, disks, and each disk's digest.
async fn picture(b: &Agent) -> Vec<String> {
    let mut out = Vec::new();
    for v in b.client.list_vms().await.unwrap().vms {
        let mut line = format!(
            "{} {:?} {:?} {:?} {:?}",
            v.name, v.power, v.role, v.replication.direction, v.replication.peer_site
        );
        for d in &v.disks {
            let digest = b.client.digest(&v.name, &d.name).await.unwrap();
            line.push_str(&format!(" {}:{}:{digest}", d.name, d.size_bytes));
        }
        out.push(line);
    }
    out
}

/// The done-when test of the credential work: a copy of everything in site A's data directory
/// (its VMs' vm.json with their peer credentials, its own controller token, its log) gets
/// nothing at site B but the replica routes of A's own replicas. Every other route of B is
/// tried with every string found there, and refused, as is a begin for A's own replica with a
/// hostile domain definition; B's VMs, power and disks are as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_site_gets_nothing_at_its_peer_but_its_own_replicas() {
    let _one = one_at_a_time().await;
    let w = World::start("takeover").await;
    let (a, b) = (&w.primary, &w.secondary);
    let (pa, pb) = (a.site.clone(), b.site.clone());
    let vm = "db-01";
    a.create_vm(vm, true).await;
    a.write(vm, 0, &pattern("a-data", 8192)).await;
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    w.wait_protected(vm, &pa, &pb).await;
    // B's own production VM, which replicates from nowhere.
    let own = "b-prod";
    b.create_vm(own, true).await;
    b.write(own, 4096, &pattern("b-data", 8192)).await;
    let before = picture(b).await;

    let mut tokens = harvest(&a.dir);
    tokens.insert(a.token.clone());
    // The harvest is real: what A legitimately holds reaches its own replica at B.
    let hashes = format!("/v1/replica/{vm}/disks/0/hashes");
    let mut reach_replica = 0;
    for t in &tokens {
        if call(&b.url, "GET", &hashes, t, None).await == 200 {
            reach_replica += 1;
        }
    }
    assert!(
        reach_replica >= 1,
        "no string of A's data directory reaches A's replica at B ({} tried)",
        tokens.len()
    );

    let disk = json!([{"name": DISK, "sizeBytes": DISK_BYTES}]);
    let op = |id: &str| Some(json!({"operationId": id}));
    let begin = |site: &str, bulk: bool| {
        Some(
            json!({"sourceSite": site, "cycleId": "evil-cycle", "disks": disk,
            "integrationServices": true, "retentionHours": 1, "bulk": bulk}),
        )
    };
    let commit = Some(json!({"cycleId": "evil-cycle", "bulk": true,
        "time": "2026-01-01T00:00:00Z", "kind": "CrashConsistent"}));
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/v1/vms".into(), None),
        ("GET", format!("/v1/vms/{own}"), None),
        (
            "PUT",
            "/v1/vms/evil".into(),
            Some(json!({"disks": disk, "power": "Running", "integrationServices": true})),
        ),
        (
            "POST",
            format!("/v1/vms/{own}/power"),
            Some(json!({"action": "PowerOff", "operationId": "evil-off"})),
        ),
        (
            "POST",
            format!("/v1/vms/{own}/power"),
            Some(json!({"action": "Shutdown", "operationId": "evil-shutdown"})),
        ),
        (
            "POST",
            format!("/v1/vms/{vm}/power"),
            Some(json!({"action": "Start", "operationId": "evil-start"})),
        ),
        (
            "DELETE",
            format!("/v1/vms/{own}?operationId=evil-del-1"),
            None,
        ),
        (
            "DELETE",
            format!("/v1/vms/{vm}?operationId=evil-del-2"),
            None,
        ),
        (
            "GET",
            format!("/v1/vms/{own}/disks/{DISK}/data?offset=0&length=4096"),
            None,
        ),
        (
            "GET",
            format!("/v1/vms/{vm}/disks/{DISK}/data?offset=0&length=4096"),
            None,
        ),
        ("GET", format!("/v1/vms/{own}/disks/{DISK}/digest"), None),
        ("GET", format!("/v1/vms/{vm}/recovery-points"), None),
        (
            "POST",
            format!("/v1/vms/{own}/replication/enable"),
            Some(
                json!({"operationId": "evil-en", "peerSite": pa, "peerUrl": a.url,
                "peerToken": "evil-peer-token-0123456789", "intervalSeconds": 30,
                "mode": "Initial"}),
            ),
        ),
        (
            "POST",
            format!("/v1/vms/{own}/replication/accept"),
            Some(json!({"operationId": "evil-acc", "sourceSite": pa})),
        ),
        (
            "POST",
            format!("/v1/vms/{vm}/replication/stop"),
            op("evil-stop"),
        ),
        (
            "POST",
            format!("/v1/vms/{vm}/failover"),
            Some(json!({"operationId": "evil-fo", "recoveryPoint": "Latest"})),
        ),
        (
            "POST",
            format!("/v1/vms/{vm}/test-failover"),
            Some(json!({"operationId": "evil-tf", "recoveryPoint": "Latest",
                "network": "evil-net"})),
        ),
        ("POST", format!("/v1/vms/{vm}/commit"), op("evil-commit")),
        (
            "POST",
            "/v1/cuts".into(),
            Some(json!({"cutId": "evil-cut", "vms": [own]})),
        ),
        (
            "PUT",
            format!("/v1/peer-credentials/{pa}"),
            Some(json!({"inbound": "evil-inbound-credential-0123456789"})),
        ),
        ("POST", format!("/v1/replica/{own}/begin"), begin(&pa, true)),
        ("POST", format!("/v1/replica/{own}/begin"), begin(&pb, true)),
        (
            "POST",
            format!("/v1/replica/{own}/begin"),
            begin(&pa, false),
        ),
        ("POST", "/v1/replica/evil/begin".into(), begin(&pa, true)),
        ("GET", format!("/v1/replica/{own}/dirty"), None),
        ("GET", format!("/v1/replica/{own}/disks/0/hashes"), None),
        (
            "PUT",
            format!("/v1/replica/{own}/cycles/evil-cycle/blocks?bulk=true"),
            None,
        ),
        ("POST", format!("/v1/replica/{own}/commit"), commit),
    ];
    let mut served = Vec::new();
    for t in &tokens {
        for (method, path, body) in &routes {
            let status = call(&b.url, method, path, t, body.clone()).await;
            if !(400..500).contains(&status) {
                served.push(format!(
                    "{method} {path}: {status} with a string of {}",
                    if t == &a.token {
                        "A's token file"
                    } else {
                        "A's data directory"
                    }
                ));
            }
        }
    }
    // A's own replica at B is the one route A's credential opens: a begin for it with a
    // hostile domain definition is refused naming what is wrong, whatever string carries it.
    let definition = |devices: &str, os: &str| {
        format!(
            "<domain type='qemu'><name>{vm}</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type>{os}</os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/src/{vm}.qcow2'/><target dev='{DISK}' bus='virtio'/></disk>\
             {devices}</devices></domain>"
        )
    };
    let hostile = [
        (
            definition(
                "<disk device='disk'><source file='/etc/shadow'/><target dev='vdb'/></disk>",
                "",
            ),
            "type attribute is missing",
        ),
        (
            definition(
                "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb'/></disk>",
                "",
            ),
            "type 'block'",
        ),
        (
            definition(
                "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>",
                "",
            ),
            "<interface type='direct'>",
        ),
        (
            definition(
                "<console type='tcp'><source mode='bind' host='0.0.0.0' service='2445'/></console>",
                "",
            ),
            "type='tcp'",
        ),
        (definition("", "<nvram>/etc/shadow</nvram>"), "<nvram>"),
        (
            definition("<hostdev mode='subsystem' type='pci'/>", ""),
            "<hostdev>",
        ),
        (
            definition("<graphics type='vnc' listen='0.0.0.0'/>", ""),
            "0.0.0.0",
        ),
        (
            definition("", "").replace("</devices>", "</devices><seclabel type='none'/>"),
            "<seclabel type='none'>",
        ),
    ];
    let begin_own = format!("/v1/replica/{vm}/begin");
    for (def, says) in &hostile {
        let body = json!({"sourceSite": pa, "cycleId": "evil-cycle", "disks": disk,
            "integrationServices": true, "retentionHours": 1, "bulk": false,
            "definition": def});
        let mut named = false;
        for t in &tokens {
            let (status, text) = answer(&b.url, "POST", &begin_own, t, Some(body.clone())).await;
            if !(400..500).contains(&status) {
                served.push(format!("POST {begin_own} with {says}: {status}"));
            }
            named |= status == 400 && text.contains(says);
        }
        assert!(named, "no begin with {says} was refused naming it");
    }
    let after = picture(b).await;
    assert!(
        served.is_empty(),
        "site B served a compromised site A:\n{}",
        served.join("\n")
    );
    assert_eq!(before, after, "site B changed");
    // B's own token is nowhere at A.
    assert!(
        !tokens.contains(&b.token),
        "B's token is in A's data directory"
    );
}

/// The pair's Secret of `source` -> `target` in the controller's namespace, found by its label
/// and annotations, with its credential.
async fn pair_secret(w: &World, source: &str, target: &str) -> Option<(String, String)> {
    let api: Api<Secret> = Api::namespaced(w.client.clone(), &w.ns);
    let list = api
        .list(&ListParams::default().labels("twinsite.io/peer-credential=true"))
        .await
        .unwrap();
    list.items.into_iter().find_map(|s| {
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        if ann.get("twinsite.io/source-site").map(String::as_str) != Some(source)
            || ann.get("twinsite.io/target-site").map(String::as_str) != Some(target)
        {
            return None;
        }
        let token = String::from_utf8(s.data?.get("token")?.0.clone()).ok()?;
        Some((s.metadata.name?, token))
    })
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + LONG;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Deleting a pair's Secret rotates its credential: the controller mints a new one, installs it
/// at the target and the source; the old one is refused at the target and replication goes on
/// with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pairs_secret_rotates_its_credential() {
    let _one = one_at_a_time().await;
    let w = World::start("rotate").await;
    let (a, b) = (&w.primary, &w.secondary);
    let (pa, pb) = (a.site.clone(), b.site.clone());
    let vm = "db-01";
    a.create_vm(vm, true).await;
    a.write(vm, 0, &pattern("first", 4096)).await;
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    w.wait_protected(vm, &pa, &pb).await;

    let (name, old) = pair_secret(&w, &pa, &pb).await.expect("the pair's Secret");
    let (_, reverse) = pair_secret(&w, &pb, &pa).await.expect("the reverse pair's");
    assert_ne!(old, reverse, "each direction has its own credential");
    assert!(![&a.token, &b.token].contains(&&old));
    let vm_json = a.vm_dir(vm).join("vm.json");
    let held = || std::fs::read_to_string(&vm_json).unwrap();
    assert!(held().contains(&old), "A holds the pair's credential");
    assert!(!held().contains(&b.token), "A holds B's token");
    let hashes = format!("/v1/replica/{vm}/disks/0/hashes");
    assert_eq!(call(&b.url, "GET", &hashes, &old, None).await, 200);
    // Only for the replicas of A's VMs.
    b.create_vm("b-prod", true).await;
    assert_eq!(
        call(
            &b.url,
            "GET",
            "/v1/replica/b-prod/disks/0/hashes",
            &old,
            None
        )
        .await,
        403
    );

    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), &w.ns);
    secrets
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + LONG;
    let new = loop {
        match pair_secret(&w, &pa, &pb).await {
            Some((_, t)) if t != old => break t,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no new credential of the pair");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eventually("the old credential refused at B", || {
        let (url, hashes, old) = (b.url.clone(), hashes.clone(), old.clone());
        async move { call(&url, "GET", &hashes, &old, None).await == 401 }
    })
    .await;
    assert_eq!(call(&b.url, "GET", &hashes, &new, None).await, 200);
    eventually("the new credential at A", || {
        let ok = held().contains(&new) && !held().contains(&old);
        async move { ok }
    })
    .await;

    // Replication goes on with it: a write reaches B.
    let data = pattern("second", 4096);
    a.write(vm, 0, &data).await;
    let want = a.digest(vm).await;
    eventually("the write replicated with the new credential", || {
        let want = want.clone();
        async move { b.client.digest(vm, DISK).await.ok() == Some(want) }
    })
    .await;
}
