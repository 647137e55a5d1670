//! The parts of libvirt's domain XML the agent reads: the file-backed disks.

use std::path::PathBuf;

/// `s` with XML's special characters escaped, for text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

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

/// Elements a replicated definition may not carry: they reach the host itself (devices,
/// directories, raw QEMU arguments, scripts libvirt runs for a NIC), and the definition comes
/// from another site.
const FORBIDDEN: &[&str] = &[
    "hostdev",
    "filesystem",
    "commandline",
    "smartcard",
    "redirdev",
    "script",
];

/// The libvirt networks the NICs of a domain definition are on (`<interface type='network'>`),
/// each once, in order.
pub fn networks(domain_xml: &str) -> Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| format!("domain XML: {e}"))?;
    let mut out: Vec<String> = Vec::new();
    let nics = doc
        .descendants()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("interface") && n.attribute("type") == Some("network"));
    for nic in nics {
        if let Some(net) = nic
            .children()
            .find(|n| n.has_tag_name("source"))
            .and_then(|s| s.attribute("network"))
            && !out.iter().any(|n| n == net)
        {
            out.push(net.to_string());
        }
    }
    Ok(out)
}

/// What a replica's definition takes from the site it boots at.
#[derive(Clone, Copy, Debug, Default)]
pub struct Placement<'a> {
    /// Networks of the source renamed here (`from`, `to`); others keep their name.
    pub networks: &'a [(String, String)],
    /// The domain type here (`kvm` or `qemu`: the accelerator); `None` keeps the source's.
    pub domain_type: Option<&'a str>,
}

/// The source's definition of domain `name`, made to run at a replica: each replicated disk
/// (`images`: target name and image path) on its image here as qcow2, every other file or
/// block disk removed (it names the source's storage), file serial consoles written to
/// `console`, NICs on the networks `place` maps them to and the domain type `place` names.
/// MAC addresses and everything else stay.
pub fn for_replica(
    definition: &str,
    name: &str,
    images: &[(String, PathBuf)],
    console: &std::path::Path,
    place: Placement<'_>,
) -> Result<String, String> {
    rewrite(definition, name, images, console, None, place)
}

/// A drill copy of domain `name`: as [`for_replica`], named `copy` instead (no UUID: it is a
/// new domain) and with every NIC on the libvirt network `network`, MAC addresses kept.
pub fn for_drill(
    definition: &str,
    name: &str,
    copy: &str,
    network: &str,
    images: &[(String, PathBuf)],
    console: &std::path::Path,
) -> Result<String, String> {
    rewrite(
        definition,
        name,
        images,
        console,
        Some((copy, network)),
        Placement::default(),
    )
}

fn rewrite(
    definition: &str,
    name: &str,
    images: &[(String, PathBuf)],
    console: &std::path::Path,
    drill: Option<(&str, &str)>,
    place: Placement<'_>,
) -> Result<String, String> {
    let doc = roxmltree::Document::parse(definition)
        .map_err(|e| format!("replicated definition: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err("replicated definition is not a <domain>".into());
    }
    let named = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text());
    if named != Some(name) {
        return Err(format!(
            "replicated definition names {named:?}, not {name:?}"
        ));
    }
    if let Some(bad) = root
        .descendants()
        .find(|n| n.is_element() && FORBIDDEN.contains(&n.tag_name().name()))
    {
        return Err(format!(
            "replicated definition of {name} has a <{}> element, which a replica never defines",
            bad.tag_name().name()
        ));
    }
    // Edits as (byte range of the original, replacement), applied from the end.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    if let Some(ty) = place.domain_type {
        let attr = root
            .attributes()
            .find(|a| a.name() == "type" && a.namespace().is_none())
            .ok_or("replicated definition has no domain type")?;
        edits.push((attr.range_value(), escape(ty)));
    }
    if let Some((copy, _)) = drill {
        for n in root.children().filter(|n| n.is_element()) {
            if n.has_tag_name("name") {
                edits.push((n.range(), format!("<name>{}</name>", escape(copy))));
            } else if n.has_tag_name("uuid") {
                edits.push((n.range(), String::new()));
            }
        }
    }
    let devices = root.children().filter(|n| n.has_tag_name("devices"));
    for dev in devices
        .flat_map(|d| d.children())
        .filter(|n| n.is_element())
    {
        if dev.has_tag_name("emulator") {
            // The program libvirt runs as this site's QEMU is this site's choice (its default),
            // never a path another site names.
            edits.push((dev.range(), String::new()));
            continue;
        }
        let child = |tag: &str| dev.children().find(|n| n.has_tag_name(tag));
        if dev.has_tag_name("disk") {
            let target = child("target").and_then(|t| t.attribute("dev"));
            let replicated = dev.attribute("device").unwrap_or("disk") == "disk"
                && dev.attribute("type") == Some("file");
            match images.iter().find(|(t, _)| Some(t.as_str()) == target) {
                Some((_, path)) if replicated => {
                    let src = format!("<source file='{}'/>", escape(&path.to_string_lossy()));
                    match child("source") {
                        Some(s) => edits.push((s.range(), src)),
                        None => return Err(format!("disk {target:?} has no <source>")),
                    }
                    let drv = "<driver name='qemu' type='qcow2'/>".to_string();
                    match child("driver") {
                        Some(d) => edits.push((d.range(), drv)),
                        None => edits.push((
                            child("source").map_or(0..0, |s| s.range().end..s.range().end),
                            drv,
                        )),
                    }
                }
                _ if dev.attribute("type") == Some("file")
                    || dev.attribute("type") == Some("block") =>
                {
                    edits.push((dev.range(), String::new()));
                }
                _ => {}
            }
        } else if let (true, Some((_, network))) = (dev.has_tag_name("interface"), drill) {
            let mut nic = String::from("<interface type='network'>");
            if let Some(mac) = child("mac").and_then(|m| m.attribute("address")) {
                nic.push_str(&format!("<mac address='{}'/>", escape(mac)));
            }
            nic.push_str(&format!("<source network='{}'/>", escape(network)));
            if let Some(model) = child("model").and_then(|m| m.attribute("type")) {
                nic.push_str(&format!("<model type='{}'/>", escape(model)));
            }
            nic.push_str("</interface>");
            edits.push((dev.range(), nic));
        } else if dev.has_tag_name("interface")
            && dev.attribute("type") == Some("network")
            && let Some(src) = child("source")
            && let Some((_, to)) = place
                .networks
                .iter()
                .find(|(from, _)| Some(from.as_str()) == src.attribute("network"))
        {
            edits.push((src.range(), format!("<source network='{}'/>", escape(to))));
        } else if (dev.has_tag_name("serial") || dev.has_tag_name("console"))
            && dev.attribute("type") == Some("file")
            && let Some(s) = child("source")
        {
            let src = format!("<source path='{}'/>", escape(&console.to_string_lossy()));
            edits.push((s.range(), src));
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = definition.to_string();
    for (r, text) in edits {
        out.replace_range(r, &text);
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

    #[test]
    fn a_replica_runs_on_its_images_and_keeps_its_identity() {
        let xml = r#"<domain type='qemu'><name>web</name><uuid>u-1</uuid><devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/src/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>
            <interface type='network'><mac address='52:54:00:12:34:56'/><source network='lan'/></interface>
            <serial type='file'><source path='/src/console.log'/></serial>
            </devices></domain>"#;
        let images = vec![(
            "vda".to_string(),
            PathBuf::from("/data/vms/web/disks/vda.qcow2"),
        )];
        let out = for_replica(
            xml,
            "web",
            &images,
            std::path::Path::new("/data/c.log"),
            Placement::default(),
        )
        .expect("rewrites");
        assert!(
            out.contains("<source file='/data/vms/web/disks/vda.qcow2'/>"),
            "{out}"
        );
        assert!(
            !out.contains("/src/web.qcow2") && !out.contains("x.iso"),
            "{out}"
        );
        assert!(
            out.contains("52:54:00:12:34:56") && out.contains("<uuid>u-1</uuid>"),
            "{out}"
        );
        assert!(out.contains("<source path='/data/c.log'/>"), "{out}");
        assert_eq!(disks(&out).expect("parses").len(), 1);
        assert!(
            for_replica(
                xml,
                "db",
                &images,
                std::path::Path::new("/c"),
                Placement::default()
            )
            .is_err()
        );
        let drill = for_drill(
            xml,
            "web",
            "web-test",
            "isolated",
            &images,
            std::path::Path::new("/c"),
        )
        .expect("rewrites");
        assert!(
            drill.contains("<name>web-test</name>") && !drill.contains("<uuid>"),
            "{drill}"
        );
        assert!(
            drill.contains("<interface type='network'><mac address='52:54:00:12:34:56'/><source network='isolated'/></interface>"),
            "{drill}"
        );
        let evil = xml.replace("</devices>", "<hostdev mode='subsystem'/></devices>");
        assert!(
            for_replica(
                &evil,
                "web",
                &images,
                std::path::Path::new("/c"),
                Placement::default()
            )
            .is_err()
        );
        let evil = xml.replace(
            "</devices>",
            "<interface type='ethernet'><script path='/tmp/x'/></interface></devices>",
        );
        assert!(
            for_replica(
                &evil,
                "web",
                &images,
                std::path::Path::new("/c"),
                Placement::default()
            )
            .is_err()
        );
        let other_qemu = xml.replace("<devices>", "<devices><emulator>/tmp/qemu</emulator>");
        let out = for_replica(
            &other_qemu,
            "web",
            &images,
            std::path::Path::new("/c"),
            Placement::default(),
        )
        .expect("rewrites");
        assert!(!out.contains("emulator"), "{out}");
    }

    #[test]
    fn a_replica_takes_the_networks_and_accelerator_of_its_site() {
        let xml = r#"<domain type='kvm' id='3'><name>web</name><devices>
            <interface type='network'><mac address='52:54:00:00:00:01'/><source network='prod-a'/><model type='virtio'/></interface>
            <interface type='network'><source network='lan' portgroup='p'/></interface>
            <interface type='network'><source network='prod-a'/></interface>
            <interface type='bridge'><source bridge='prod-a'/></interface>
            </devices></domain>"#;
        assert_eq!(networks(xml).expect("parses"), vec!["prod-a", "lan"]);
        let maps = vec![("prod-a".to_string(), "prod-b".to_string())];
        let place = Placement {
            networks: &maps,
            domain_type: Some("qemu"),
        };
        let out =
            for_replica(xml, "web", &[], std::path::Path::new("/c"), place).expect("rewrites");
        assert!(out.starts_with("<domain type='qemu' id='3'>"), "{out}");
        assert_eq!(networks(&out).expect("parses"), vec!["prod-b", "lan"]);
        assert!(
            out.contains(
                "<mac address='52:54:00:00:00:01'/><source network='prod-b'/><model type='virtio'/>"
            ),
            "{out}"
        );
        assert!(
            out.contains("portgroup='p'") && out.contains("<source bridge='prod-a'/>"),
            "{out}"
        );
        let kept = for_replica(
            xml,
            "web",
            &[],
            std::path::Path::new("/c"),
            Placement::default(),
        )
        .expect("rewrites");
        assert!(kept.starts_with("<domain type='kvm'"), "{kept}");
        assert_eq!(networks(&kept).expect("parses"), vec!["prod-a", "lan"]);
    }
}
