//! Every manifest in examples/ is accepted by a real API server as written.

use std::path::{Path, PathBuf};

use twinsite::envtest;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// (kind, name) of every object in examples/, in file-name order.
fn example_objects() -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut objects = vec![];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap().to_string();
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            objects.push((kind, name));
        }
    }
    objects
}

#[tokio::test]
async fn every_example_is_accepted_as_written() {
    let cp = envtest::shared().await;
    let objects = example_objects();
    for kind in [
        "Namespace",
        "Secret",
        "Site",
        "ReplicatedVM",
        "FailoverPlan",
    ] {
        assert!(
            objects.iter().any(|(k, _)| k == kind),
            "examples/ has no {kind}"
        );
    }

    // The same command the README and `twinsite local` use.
    let out = cp
        .kubectl()
        .args(["apply", "-R", "-f"])
        .arg(examples_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply -f examples/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (kind, name) in &objects {
        // kubectl prints `kind[.group]/name created`.
        let kind = kind.to_lowercase();
        let tail = format!("/{name} created");
        assert!(
            stdout.lines().any(|l| l.ends_with(&tail)
                && (l.starts_with(&format!("{kind}/")) || l.starts_with(&format!("{kind}.")))),
            "no {kind} {name} created in:\n{stdout}"
        );
    }

    // Applied again, nothing changes: defaults filled in by the API server do not fight
    // kubectl apply. (Secrets written with stringData always show as configured.)
    let out = cp
        .kubectl()
        .args(["apply", "-R", "-f"])
        .arg(examples_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.ends_with(" unchanged") && !l.starts_with("secret/"))
            .count(),
        objects.iter().filter(|(k, _)| k != "Secret").count(),
        "{stdout}"
    );

    // What the demo relies on: the sites' addresses and tokens, the VMs' copy frequency.
    let get = |args: &[&str]| {
        let out = cp.kubectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        get(&["get", "site", "primary", "-o", "jsonpath={.spec.agent.url}"]),
        "http://127.0.0.1:7101"
    );
    assert_eq!(
        get(&[
            "get",
            "site",
            "secondary",
            "-o",
            "jsonpath={.spec.agent.url}"
        ]),
        "http://127.0.0.1:7102"
    );
    for secret in ["primary-agent", "secondary-agent"] {
        let token = get(&[
            "get",
            "secret",
            "-n",
            "twinsite-system",
            secret,
            "-o",
            "jsonpath={.data.token}",
        ]);
        assert!(!token.is_empty(), "secret {secret} has no token");
    }
    let intervals = get(&[
        "get",
        "rvm",
        "-n",
        "finance",
        "-o",
        "jsonpath={range .items[*]}{.spec.replication.intervalSeconds}{\"\\n\"}{end}",
    ]);
    assert!(intervals.lines().count() >= 2, "{intervals}");
    assert!(intervals.lines().all(|l| l == "30"), "{intervals}");
}
