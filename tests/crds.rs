//! The checked-in CRDs (crds/ and the Helm chart's crds/) are exactly what `twinsite crds` prints.

use std::path::Path;
use std::process::Command;

const CHECKED_IN: [&str; 2] = ["crds/twinsite.yaml", "charts/twinsite/crds/twinsite.yaml"];

fn generated() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_twinsite"))
        .arg("crds")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "twinsite crds failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn checked_in_crds_match_the_code() {
    let want = generated();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = vec![];
    for file in CHECKED_IN {
        let have = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        if have != want {
            let first = have
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(have.lines().count().min(want.lines().count()));
            stale.push(format!("{file} (first difference at line {})", first + 1));
        }
    }
    assert!(
        stale.is_empty(),
        "the checked-in CRDs differ from the code: {}.\nRegenerate them with:\n  {}",
        stale.join(", "),
        CHECKED_IN
            .map(|f| format!("cargo run -- crds > {f}"))
            .join("\n  ")
    );
}

#[test]
fn the_crds_are_the_three_kinds() {
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&generated())
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "sites.twinsite.io",
            "replicatedvms.twinsite.io",
            "failoverplans.twinsite.io"
        ]
    );
    for d in &docs {
        assert_eq!(d["kind"], "CustomResourceDefinition");
        let v = &d["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(
            v["subresources"]["status"].is_mapping(),
            "{}",
            d["metadata"]["name"].as_str().unwrap()
        );
    }
}
