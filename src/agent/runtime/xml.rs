//! The parts of libvirt's domain XML the agent reads: the file-backed disks.

use std::path::PathBuf;

/// A disk of a domain definition, before its size is known.
#[derive(Debug, PartialEq, Eq)]
pub struct XmlDisk {
    pub target: String,
    pub format: String,
    pub path: PathBuf,
}

/// The file-backed disks (`device='disk'`) of a domain definition, in order. CD-ROMs,
/// network and block-device disks are not replicated and are left out.
pub fn disks(domain_xml: &str) -> Result<Vec<XmlDisk>, String> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| format!("domain XML: {e}"))?;
    let mut out = Vec::new();
    let devices = doc
        .descendants()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children());
    for disk in devices.filter(|n| n.has_tag_name("disk")) {
        if disk.attribute("device").unwrap_or("disk") != "disk"
            || disk.attribute("type") != Some("file")
        {
            continue;
        }
        let child = |tag: &str| disk.children().find(|n| n.has_tag_name(tag));
        let (Some(target), Some(path)) = (
            child("target").and_then(|t| t.attribute("dev")),
            child("source").and_then(|s| s.attribute("file")),
        ) else {
            continue;
        };
        let format = child("driver")
            .and_then(|d| d.attribute("type"))
            .unwrap_or("raw");
        out.push(XmlDisk {
            target: target.to_string(),
            format: format.to_string(),
            path: PathBuf::from(path),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_disks_are_read_and_others_left_out() {
        let xml = r#"<domain type='qemu'><name>web</name><devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/var/lib/vm/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>
            <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/></disk>
            <disk type='file' device='disk'><source file='/var/lib/vm/data.img'/>
              <target dev='vdc'/></disk>
            </devices></domain>"#;
        let d = disks(xml).expect("parses");
        assert_eq!(
            d,
            vec![
                XmlDisk {
                    target: "vda".into(),
                    format: "qcow2".into(),
                    path: "/var/lib/vm/web.qcow2".into()
                },
                XmlDisk {
                    target: "vdc".into(),
                    format: "raw".into(),
                    path: "/var/lib/vm/data.img".into()
                },
            ]
        );
        assert!(disks("<domain").is_err());
    }
}
