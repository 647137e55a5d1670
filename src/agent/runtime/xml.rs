//! The parts of libvirt's domain XML the agent reads: the file-backed disks.

use std::path::PathBuf;

use super::domspec;

pub use super::domspec::escape;

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
    /// This host's security models: each confines the replica with a dynamic label.
    pub security_models: &'a [String],
}

/// The definition domain `name` boots from at a replica, generated from the source's
/// `definition` read through the allowlist ([`domspec`]): each replicated disk (`images`: disk
/// name and image path) on its image here as qcow2, the serial console written to `console`,
/// NICs on the networks `place` maps them to, the domain type and security labels `place`
/// names. The UUID, MAC addresses, CPU, memory and machine stay the source's.
pub fn for_replica(
    definition: &str,
    name: &str,
    images: &[(String, PathBuf)],
    console: &std::path::Path,
    place: Placement<'_>,
) -> Result<String, String> {
    let spec = read(definition, name)?;
    spec.render(&domspec::Target {
        name,
        keep_uuid: true,
        domain_type: place.domain_type,
        images,
        console,
        networks: domspec::Networks::Mapped(place.networks),
        security_models: place.security_models,
    })
    .map_err(|e| format!("replicated definition of {name}: {e}"))
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
    security_models: &[String],
) -> Result<String, String> {
    let spec = read(definition, name)?;
    spec.render(&domspec::Target {
        name: copy,
        keep_uuid: false,
        domain_type: None,
        images,
        console,
        networks: domspec::Networks::All(network),
        security_models,
    })
    .map_err(|e| format!("replicated definition of {name}: {e}"))
}

/// The stored definition of `name` through the allowlist (it was checked when it arrived;
/// read again, nothing outside the allowlist can reach libvirt).
fn read(definition: &str, name: &str) -> Result<domspec::DomainSpec, String> {
    let spec = domspec::DomainSpec::parse(definition)
        .map_err(|e| format!("replicated definition of {name}: {e}"))?;
    if spec.name != name {
        return Err(format!(
            "replicated definition names {:?}, not {name:?}",
            spec.name
        ));
    }
    Ok(spec)
}

/// This host's security models from libvirt's capabilities XML (`<host><secmodel><model>`),
/// `none` left out.
pub fn security_models(capabilities: &str) -> Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(capabilities).map_err(|e| format!("capabilities: {e}"))?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("secmodel"))
        .filter(|n| n.parent().is_some_and(|p| p.has_tag_name("host")))
        .filter_map(|n| n.children().find(|c| c.has_tag_name("model")))
        .filter_map(|m| m.text())
        .map(str::trim)
        .filter(|m| !m.is_empty() && *m != "none")
        .map(str::to_string)
        .collect())
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

    /// The source's definition as libvirt writes it back (`dumpxml --inactive`) for the test
    /// guest: what a replica is generated from.
    const SOURCE: &str = r#"<domain type='qemu'>
  <name>web</name>
  <uuid>0b3c4b8e-2d0c-4c4e-9a57-3f1f8c1d2e3a</uuid>
  <memory unit='KiB'>196608</memory>
  <currentMemory unit='KiB'>196608</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/guest/vmlinuz</kernel>
    <initrd>/guest/initrd.gz</initrd>
    <cmdline>console=ttyS0 twinsite.verify=1</cmdline>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/tmp/qemu</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/src/web.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'><address type='pci' slot='0x01'/></controller>
    <controller type='pci' index='0' model='pci-root'/>
    <controller type='virtio-serial' index='0'/>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='lan' portgroup='p'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='/src/console.log'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
    </serial>
    <console type='file'><source path='/src/console.log'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"#;

    fn images() -> Vec<(String, PathBuf)> {
        vec![(
            "vda".to_string(),
            PathBuf::from("/data/vms/web/disks/vda.qcow2"),
        )]
    }

    /// A UEFI guest as newer libvirt keeps it (the chosen firmware and the domain's NVRAM file
    /// in its persistent definition): a drill copy and a replica boot this site's firmware with
    /// an NVRAM file libvirt makes under their own name, never the source's; without
    /// `firmware='efi'` a loader or NVRAM path is still refused.
    #[test]
    fn a_uefi_guest_s_copies_get_their_own_nvram() {
        let efi = SOURCE.replace(
            "<os>",
            "<os firmware='efi'><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd\
             </loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>\
             /var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>",
        );
        assert_ne!(efi, SOURCE);
        let drill = for_drill(
            &efi,
            "web",
            "web-test",
            "isolated",
            &images(),
            std::path::Path::new("/c"),
            &[],
        )
        .expect("generates");
        let replica = for_replica(
            &efi,
            "web",
            &images(),
            std::path::Path::new("/c"),
            Placement::default(),
        )
        .expect("generates");
        for out in [&drill, &replica] {
            assert!(out.contains("<os firmware='efi'>"), "{out}");
            for gone in ["nvram", "VARS", "loader", "OVMF"] {
                assert!(!out.contains(gone), "{gone} in {out}");
            }
        }
        let manual = SOURCE.replace(
            "<os>",
            "<os><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>",
        );
        let e = for_drill(
            &manual,
            "web",
            "web-test",
            "isolated",
            &images(),
            std::path::Path::new("/c"),
            &[],
        )
        .expect_err("refused");
        assert!(e.contains("<os><nvram>"), "{e}");
    }

    #[test]
    fn a_replica_runs_on_its_images_and_keeps_its_identity() {
        let models = vec!["apparmor".to_string(), "dac".to_string()];
        let place = Placement {
            security_models: &models,
            ..Placement::default()
        };
        let out = for_replica(
            SOURCE,
            "web",
            &images(),
            std::path::Path::new("/data/c.log"),
            place,
        )
        .expect("generates");
        for want in [
            "<source file='/data/vms/web/disks/vda.qcow2'/>",
            "<driver name='qemu' type='qcow2'/>",
            "<target dev='vda' bus='virtio'/>",
            "<uuid>0b3c4b8e-2d0c-4c4e-9a57-3f1f8c1d2e3a</uuid>",
            "<mac address='52:54:00:12:34:56'/><source network='lan' portgroup='p'/>",
            "<serial type='file'><source path='/data/c.log'/>",
            "<type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>",
            "<kernel>/guest/vmlinuz</kernel><initrd>/guest/initrd.gz</initrd>",
            "<memory unit='KiB'>196608</memory>",
            "name='org.qemu.guest_agent.0'",
            "<seclabel type='dynamic' model='apparmor' relabel='yes'/>",
            "<seclabel type='dynamic' model='dac' relabel='yes'/>",
            "<domain type='qemu'>",
        ] {
            assert!(out.contains(want), "{want} missing from {out}");
        }
        for gone in ["/src/", "/tmp/qemu", "emulator", "<address"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert_eq!(disks(&out).expect("parses").len(), 1);
        // What a replica is defined with is itself a definition the allowlist reads (it
        // travels back at failback).
        let again = domspec::DomainSpec::parse(&out).expect("the generated definition reads");
        assert_eq!(again, domspec::DomainSpec::parse(SOURCE).expect("reads"));
        assert!(
            for_replica(
                SOURCE,
                "db",
                &images(),
                std::path::Path::new("/c"),
                Placement::default()
            )
            .is_err()
        );
        let drill = for_drill(
            SOURCE,
            "web",
            "web-test",
            "isolated",
            &images(),
            std::path::Path::new("/c"),
            &[],
        )
        .expect("generates");
        assert!(
            drill.contains("<name>web-test</name>") && !drill.contains("<uuid>"),
            "{drill}"
        );
        assert!(
            drill.contains("<interface type='network'><mac address='52:54:00:12:34:56'/><source network='isolated'/><model type='virtio'/></interface>"),
            "{drill}"
        );
        assert!(!drill.contains("seclabel"), "{drill}");
        let evil = SOURCE.replace("</devices>", "<hostdev mode='subsystem'/></devices>");
        let e = for_replica(
            &evil,
            "web",
            &images(),
            std::path::Path::new("/c"),
            Placement::default(),
        )
        .unwrap_err();
        assert!(e.contains("<hostdev>"), "{e}");
    }

    #[test]
    fn a_replica_takes_the_networks_and_accelerator_of_its_site() {
        let xml = r#"<domain type='kvm' id='3'><name>web</name><memory>1024</memory><devices>
            <interface type='network'><mac address='52:54:00:00:00:01'/><source network='prod-a'/><model type='virtio'/></interface>
            <interface type='network'><source network='lan' portgroup='p'/></interface>
            <interface type='network'><source network='prod-a'/></interface>
            </devices></domain>"#;
        assert_eq!(networks(xml).expect("parses"), vec!["prod-a", "lan"]);
        let maps = vec![("prod-a".to_string(), "prod-b".to_string())];
        let place = Placement {
            networks: &maps,
            domain_type: Some("qemu"),
            security_models: &[],
        };
        let out =
            for_replica(xml, "web", &[], std::path::Path::new("/c"), place).expect("generates");
        assert!(out.starts_with("<domain type='qemu'>"), "{out}");
        assert_eq!(networks(&out).expect("parses"), vec!["prod-b", "lan"]);
        assert!(
            out.contains(
                "<mac address='52:54:00:00:00:01'/><source network='prod-b'/><model type='virtio'/>"
            ),
            "{out}"
        );
        assert!(out.contains("portgroup='p'"), "{out}");
        let kept = for_replica(
            xml,
            "web",
            &[],
            std::path::Path::new("/c"),
            Placement::default(),
        )
        .expect("generates");
        assert!(kept.starts_with("<domain type='kvm'"), "{kept}");
        assert_eq!(networks(&kept).expect("parses"), vec!["prod-a", "lan"]);
    }

    #[test]
    fn security_models_come_from_the_capabilities() {
        let caps = "<capabilities><host><secmodel><model>apparmor</model><doi>0</doi></secmodel>\
            <secmodel><model>dac</model><doi>0</doi></secmodel></host>\
            <guest><secmodel><model>x</model></secmodel></guest></capabilities>";
        assert_eq!(
            security_models(caps).expect("parses"),
            vec!["apparmor", "dac"]
        );
        let none =
            "<capabilities><host><secmodel><model>none</model></secmodel></host></capabilities>";
        assert!(security_models(none).expect("parses").is_empty());
    }
}
