//! Whether the persistent bitmap of a checkpoint, in the images of a domain that is off, holds
//! every change since that checkpoint.
//!
//! A running domain's backups go through libvirt, which checks the bitmap chain itself. A
//! domain that is off is read with `qemu-nbd --bitmap`, which takes the first bitmap of that
//! name it finds down the backing chain and refuses only an inconsistent one: after an external
//! snapshot it would serve the old image's bitmap, which saw none of the writes since. So every
//! layer is checked first (`qemu-img info --backing-chain`): the top image must hold the bitmap,
//! enabled (`auto`: it tracks every write) and not `in-use` (a process that had the image open
//! stopped without saving it, so writes may be missing); no layer below may hold it (the
//! checkpoint predates a snapshot, and its changes are spread over images that `qemu-nbd`
//! cannot merge). Otherwise the caller compares block hashes.

use std::path::Path;

/// Checks the bitmap `cp` of the qcow2 image `path` and its backing chain; the reason it cannot
/// be trusted if it cannot.
pub fn check(path: &Path, cp: &str) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json", "-U"])
        .arg(path)
        .output()
        .map_err(|e| format!("running qemu-img (Debian package qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let chain: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img info {} answered no JSON: {e}", path.display()))?;
    verdict(&chain, cp)
}

/// [`check`] on the answer of `qemu-img info --backing-chain --output=json` (top image first).
pub fn verdict(chain: &serde_json::Value, cp: &str) -> Result<(), String> {
    let layers = chain
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or("qemu-img info listed no image")?;
    for (i, layer) in layers.iter().enumerate() {
        let file = layer
            .get("filename")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        let flags = bitmap_flags(layer, cp);
        if i > 0 {
            if flags.is_some() {
                return Err(format!(
                    "backing file {file} holds bitmap {cp} too: the checkpoint predates a \
                     snapshot and its changes are spread over several images"
                ));
            }
            continue;
        }
        let Some(flags) = flags else {
            return Err(format!(
                "the top image {file} has no bitmap {cp} (a snapshot or another tool replaced \
                 the image)"
            ));
        };
        if flags.iter().any(|f| f == "in-use") {
            return Err(format!(
                "bitmap {cp} of {file} is in use: a process that had the image open stopped \
                 without saving it"
            ));
        }
        if !flags.iter().any(|f| f == "auto") {
            return Err(format!(
                "bitmap {cp} of {file} is disabled: it does not track writes"
            ));
        }
    }
    Ok(())
}

/// The flags of bitmap `cp` in one layer of `qemu-img info`, if it holds one.
fn bitmap_flags(layer: &serde_json::Value, cp: &str) -> Option<Vec<String>> {
    layer
        .pointer("/format-specific/data/bitmaps")
        .and_then(serde_json::Value::as_array)?
        .iter()
        .find(|b| b.get("name").and_then(serde_json::Value::as_str) == Some(cp))
        .map(|b| {
            b.get("flags")
                .and_then(serde_json::Value::as_array)
                .map(|f| {
                    f.iter()
                        .filter_map(serde_json::Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        })
}

#[cfg(test)]
mod tests {
    use super::verdict;
    use serde_json::json;

    fn layer(file: &str, bitmaps: serde_json::Value) -> serde_json::Value {
        json!({"filename": file, "format": "qcow2",
               "format-specific": {"type": "qcow2", "data": {"bitmaps": bitmaps}}})
    }

    #[test]
    fn an_enabled_consistent_bitmap_in_the_top_image_is_trusted() {
        let one = json!([layer("a.qcow2", json!([{"name": "cp", "flags": ["auto"]}]))]);
        assert_eq!(verdict(&one, "cp"), Ok(()));
        let over_a_base = json!([
            layer("top.qcow2", json!([{"name": "cp", "flags": ["auto"]}])),
            json!({"filename": "base.qcow2", "format": "qcow2"}),
        ]);
        assert_eq!(verdict(&over_a_base, "cp"), Ok(()));
    }

    #[test]
    fn a_missing_in_use_disabled_or_spread_bitmap_is_not() {
        let cases = [
            (
                json!([
                    json!({"filename": "top.qcow2", "format": "qcow2"}),
                    layer("base.qcow2", json!([{"name": "cp", "flags": ["auto"]}])),
                ]),
                "has no bitmap",
            ),
            (
                json!([layer(
                    "a",
                    json!([{"name": "cp", "flags": ["in-use", "auto"]}])
                )]),
                "in use",
            ),
            (
                json!([layer("a", json!([{"name": "cp", "flags": []}]))]),
                "disabled",
            ),
            (
                json!([
                    layer("top", json!([{"name": "cp", "flags": ["auto"]}])),
                    layer("base", json!([{"name": "cp", "flags": ["auto"]}])),
                ]),
                "spread over",
            ),
            (
                json!([layer("a", json!([{"name": "other", "flags": ["auto"]}]))]),
                "has no bitmap",
            ),
            (json!([]), "no image"),
        ];
        for (chain, why) in cases {
            let got = verdict(&chain, "cp");
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{chain}: {got:?}"
            );
        }
    }
}
