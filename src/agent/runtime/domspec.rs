//! A domain definition from another site, read through an allowlist, and the definition a
//! replica boots, generated from what was read.
//!
//! The peer's XML never reaches libvirt. [`DomainSpec::parse`] keeps a small typed subset (CPU,
//! memory, machine and OS type, direct kernel boot, the replicated disks by name, NICs on
//! libvirt networks, a serial console, the guest agent's channel, plain emulated devices) and
//! refuses every other element, attribute and value, naming it: whatever reaches the host
//! itself (host files and devices, sockets, firmware and NVRAM paths, other NIC types,
//! security labels that loosen confinement, graphics on every address) has no place in the
//! subset. [`DomainSpec::render`] writes the definition a replica boots from the subset with
//! this site's own images, console file, networks and a dynamic (confining) security label.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use roxmltree::Node;

/// A peer's definition the allowlist refuses; the message names the element or attribute.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

type Res<T> = Result<T, Refused>;

fn refuse<T>(msg: impl Into<String>) -> Res<T> {
    Err(Refused(msg.into()))
}

/// The parts of a domain a replica boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub name: String,
    pub uuid: Option<String>,
    /// `kvm` or `qemu` at the source; a replica boots under its site's accelerator.
    pub domain_type: String,
    pub memory_kib: u64,
    pub current_memory_kib: Option<u64>,
    pub vcpus: u32,
    pub os: Os,
    /// Features that are flags (`<acpi/>`, `<apic/>`, ...), with their `state` if given.
    pub features: Vec<(String, Option<String>)>,
    pub cpu: Option<Cpu>,
    pub clock: Option<Clock>,
    /// `on_poweroff`, `on_reboot`, `on_crash` and their action.
    pub lifecycle: Vec<(String, String)>,
    pub disks: Vec<Disk>,
    pub controllers: Vec<Controller>,
    pub nics: Vec<Nic>,
    /// A serial console (written to the agent's file at the replica).
    pub serial: bool,
    /// The qemu-ga channel `org.qemu.guest_agent.0`.
    pub guest_agent: bool,
    /// Emulated devices with no host side: (element, attributes), e.g. `input`, `video`.
    pub plain: Vec<Plain>,
    /// VNC or SPICE consoles, listening on the loopback address only.
    pub graphics: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Os {
    pub arch: Option<String>,
    pub machine: Option<String>,
    /// `efi`: libvirt picks this site's firmware and keeps the NVRAM in its own directory.
    pub firmware: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub boot: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cpu {
    pub mode: Option<String>,
    pub match_: Option<String>,
    pub check: Option<String>,
    pub model: Option<(String, Option<String>)>,
    pub vendor: Option<String>,
    /// sockets, dies, cores, threads.
    pub topology: Vec<(String, u32)>,
    /// (policy, name).
    pub features: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Clock {
    pub offset: String,
    /// (name, tickpolicy, present).
    pub timers: Vec<Plain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The target device, which is the replicated disk's name.
    pub target: String,
    pub bus: Option<String>,
    pub boot_order: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub kind: String,
    pub index: Option<u32>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub mac: Option<String>,
    pub network: String,
    pub portgroup: Option<String>,
    pub model: Option<String>,
    pub boot_order: Option<u32>,
}

/// An element written back with its checked attributes only (and one checked child).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    pub tag: String,
    pub attrs: Vec<(String, String)>,
    /// `<model type='...'/>` of a video or a watchdog-less device, `<backend>` of an rng.
    pub child: Option<String>,
}

/// Where the definition a replica boots points.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The domain's name here (a drill copy's own name).
    pub name: &'a str,
    /// Keep the source's UUID (a drill copy is a new domain and gets none).
    pub keep_uuid: bool,
    /// The domain type here; `None` keeps the source's.
    pub domain_type: Option<&'a str>,
    /// Disk name and the agent's image of it (qcow2).
    pub images: &'a [(String, PathBuf)],
    /// The file the serial console writes.
    pub console: &'a Path,
    pub networks: Networks<'a>,
    /// This host's security models (`apparmor`, `selinux`, `dac`): each gets a dynamic label.
    pub security_models: &'a [String],
}

/// Which libvirt networks the NICs join.
#[derive(Debug, Clone, Copy)]
pub enum Networks<'a> {
    /// The source's networks, renamed by these (`from`, `to`); others keep their name.
    Mapped(&'a [(String, String)]),
    /// Every NIC on this one network (a drill copy's isolated network).
    All(&'a str),
}

/// The most of anything countable in a definition (vCPUs, disks, NICs, devices).
const MAX_ITEMS: usize = 256;
/// The longest kernel command line.
const MAX_CMDLINE: usize = 4096;
/// The largest memory a definition may ask for: 16 TiB.
const MAX_MEMORY_KIB: u64 = 16 << 30;

/// Checked names of things libvirt knows (models, buses, machine types): 1 to 64 of letters,
/// digits, `.`, `_`, `-`, `:`.
fn token(at: &str, v: &str) -> Res<String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(v.to_string())
    } else {
        refuse(format!("{at} {v:?} is not a plain name"))
    }
}

fn one_of(at: &str, v: &str, allowed: &[&str]) -> Res<String> {
    if allowed.contains(&v) {
        Ok(v.to_string())
    } else {
        refuse(format!(
            "{at}='{v}' is not allowed (allowed: {})",
            allowed.join(", ")
        ))
    }
}

fn number<T: std::str::FromStr>(at: &str, v: &str) -> Res<T> {
    v.trim()
        .parse()
        .or_else(|_| refuse(format!("{at} {v:?} is not a number")))
}

fn tag<'a>(n: Node<'a, '_>) -> &'a str {
    n.tag_name().name()
}

fn elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(Node::is_element)
}

/// Refuses every attribute of `n` not in `allowed` (namespaced ones too).
fn attrs_only(n: Node<'_, '_>, at: &str, allowed: &[&str]) -> Res<()> {
    for a in n.attributes() {
        if a.namespace().is_some() || !allowed.contains(&a.name()) {
            return refuse(format!("{at}: attribute '{}' is not allowed", a.name()));
        }
    }
    Ok(())
}

/// Refuses every child element of `n` not in `allowed`.
fn children_only(n: Node<'_, '_>, at: &str, allowed: &[&str]) -> Res<()> {
    for c in elements(n) {
        if c.tag_name().namespace().is_some() || !allowed.contains(&tag(c)) {
            return refuse(format!("{at}: <{}> is not allowed", tag(c)));
        }
    }
    Ok(())
}

/// The text of an element that holds only text.
fn text<'a>(n: Node<'a, '_>) -> &'a str {
    if elements(n).next().is_some() {
        // Never the text of an element with children: the value would be only a part.
        return "\u{0}";
    }
    n.text().unwrap_or("").trim()
}

fn memory_kib(n: Node<'_, '_>, at: &str) -> Res<u64> {
    attrs_only(n, at, &["unit"])?;
    children_only(n, at, &[])?;
    let v: u64 = number(at, text(n))?;
    let unit = n.attribute("unit").unwrap_or("KiB");
    let bytes_per: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return refuse(format!("{at}: unit '{unit}' is not known")),
    };
    let kib = v.saturating_mul(bytes_per) / 1024;
    if kib == 0 || kib > MAX_MEMORY_KIB {
        return refuse(format!("{at} {v} {unit} is out of range"));
    }
    Ok(kib)
}

fn uuid(v: &str) -> Res<String> {
    let hex: String = v.chars().filter(|c| *c != '-').collect();
    if hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) && v.len() <= 36 {
        Ok(v.to_string())
    } else {
        refuse(format!("<uuid> {v:?} is not a UUID"))
    }
}

fn mac(v: &str) -> Res<String> {
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        Ok(v.to_string())
    } else {
        refuse(format!("<mac address='{v}'> is not a MAC address"))
    }
}

/// A boot file's path as the peer names it: absolute, without `.` or `..`.
fn boot_path(at: &str, v: &str) -> Res<PathBuf> {
    let p = PathBuf::from(v);
    let plain = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || v.len() > 1024 {
        return refuse(format!("{at} {v:?} is not an absolute path"));
    }
    Ok(p)
}

/// Whether `addr` is a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
fn loopback(addr: &str) -> bool {
    addr == "localhost"
        || addr
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl DomainSpec {
    /// Reads a definition through the allowlist. The disks are checked against the
    /// replicated ones and the boot files against this site's directories by [`check`].
    pub fn parse(definition: &str) -> Res<Self> {
        let doc =
            roxmltree::Document::parse(definition).or_else(|e| refuse(format!("not XML: {e}")))?;
        let root = doc.root_element();
        if tag(root) != "domain" || root.tag_name().namespace().is_some() {
            return refuse("the root element is not <domain>");
        }
        attrs_only(root, "<domain>", &["type", "id"])?;
        let domain_type = one_of(
            "<domain type>",
            root.attribute("type").unwrap_or(""),
            &["kvm", "qemu"],
        )?;
        let mut spec = DomainSpec {
            name: String::new(),
            uuid: None,
            domain_type,
            memory_kib: 0,
            current_memory_kib: None,
            vcpus: 1,
            os: Os::default(),
            features: Vec::new(),
            cpu: None,
            clock: None,
            lifecycle: Vec::new(),
            disks: Vec::new(),
            controllers: Vec::new(),
            nics: Vec::new(),
            serial: false,
            guest_agent: false,
            plain: Vec::new(),
            graphics: Vec::new(),
        };
        let mut seen = std::collections::BTreeSet::new();
        for n in elements(root) {
            let t = tag(n);
            if n.tag_name().namespace().is_some() {
                return refuse(format!("<{t}> of another XML namespace is not allowed"));
            }
            // Elements that may appear once (libvirt refuses repeats; so does this).
            if t != "seclabel" && !seen.insert(t.to_string()) {
                return refuse(format!("<{t}> appears twice"));
            }
            match t {
                "name" => {
                    attrs_only(n, "<name>", &[])?;
                    let name = text(n);
                    if !crate::agent::input::valid_name(name) {
                        return refuse(format!("<name> {name:?} is not a VM name"));
                    }
                    spec.name = name.to_string();
                }
                "uuid" => spec.uuid = Some(uuid(text(n))?),
                // Words for people, and other tools' notes: never defined here.
                "title" | "description" | "metadata" => {}
                "memory" => spec.memory_kib = memory_kib(n, "<memory>")?,
                "currentMemory" => {
                    spec.current_memory_kib = Some(memory_kib(n, "<currentMemory>")?);
                }
                "vcpu" => {
                    attrs_only(n, "<vcpu>", &["placement", "current"])?;
                    one_of(
                        "<vcpu placement>",
                        n.attribute("placement").unwrap_or("static"),
                        &["static"],
                    )?;
                    spec.vcpus = number("<vcpu>", text(n))?;
                    if spec.vcpus == 0 || spec.vcpus as usize > MAX_ITEMS {
                        return refuse(format!("<vcpu> {} is out of range", spec.vcpus));
                    }
                }
                "os" => spec.os = parse_os(n)?,
                "features" => {
                    children_only(
                        n,
                        "<features>",
                        &[
                            "acpi",
                            "apic",
                            "pae",
                            "hap",
                            "pvspinlock",
                            "vmcoreinfo",
                            "pmu",
                            "vmport",
                            "smm",
                        ],
                    )?;
                    for f in elements(n) {
                        let at = format!("<features><{}>", tag(f));
                        attrs_only(f, &at, &["state"])?;
                        children_only(f, &at, &[])?;
                        let state = f
                            .attribute("state")
                            .map(|s| one_of(&format!("{at} state"), s, &["on", "off"]))
                            .transpose()?;
                        spec.features.push((tag(f).to_string(), state));
                    }
                }
                "cpu" => spec.cpu = Some(parse_cpu(n)?),
                "clock" => spec.clock = Some(parse_clock(n)?),
                "on_poweroff" | "on_reboot" | "on_crash" => {
                    attrs_only(n, &format!("<{t}>"), &[])?;
                    let action = one_of(
                        &format!("<{t}>"),
                        text(n),
                        &["destroy", "restart", "preserve", "rename-restart"],
                    )?;
                    spec.lifecycle.push((t.to_string(), action));
                }
                // Guest suspend support: nothing of the host.
                "pm" => {
                    children_only(n, "<pm>", &["suspend-to-mem", "suspend-to-disk"])?;
                }
                "devices" => parse_devices(n, &mut spec)?,
                "seclabel" => check_seclabel(n)?,
                _ => {
                    return refuse(format!("<{t}> is not allowed in a replicated definition"));
                }
            }
        }
        if spec.name.is_empty() {
            return refuse("<name> is missing");
        }
        if spec.memory_kib == 0 {
            return refuse("<memory> is missing");
        }
        Ok(spec)
    }

    /// The definition a replica boots from this subset: see [`Target`].
    pub fn render(&self, t: &Target<'_>) -> Result<String, Refused> {
        let mut x = String::new();
        let ty = t.domain_type.unwrap_or(&self.domain_type);
        // Writing to a String cannot fail.
        let _ = write!(
            x,
            "<domain type='{}'><name>{}</name>",
            escape(ty),
            escape(t.name)
        );
        if let (true, Some(u)) = (t.keep_uuid, &self.uuid) {
            let _ = write!(x, "<uuid>{}</uuid>", escape(u));
        }
        let _ = write!(x, "<memory unit='KiB'>{}</memory>", self.memory_kib);
        if let Some(m) = self.current_memory_kib {
            let _ = write!(x, "<currentMemory unit='KiB'>{m}</currentMemory>");
        }
        let _ = write!(x, "<vcpu>{}</vcpu>", self.vcpus);
        self.render_os(&mut x);
        if !self.features.is_empty() {
            x.push_str("<features>");
            for (f, state) in &self.features {
                match state {
                    Some(s) => {
                        let _ = write!(x, "<{f} state='{s}'/>");
                    }
                    None => {
                        let _ = write!(x, "<{f}/>");
                    }
                }
            }
            x.push_str("</features>");
        }
        if let Some(c) = &self.cpu {
            render_cpu(&mut x, c);
        }
        if let Some(c) = &self.clock {
            let _ = write!(x, "<clock offset='{}'>", escape(&c.offset));
            for p in &c.timers {
                render_plain(&mut x, p);
            }
            x.push_str("</clock>");
        }
        for (ev, action) in &self.lifecycle {
            let _ = write!(x, "<{ev}>{action}</{ev}>");
        }
        x.push_str("<devices>");
        for d in &self.disks {
            let Some((_, image)) = t.images.iter().find(|(n, _)| *n == d.target) else {
                // A disk without an image here is not replicated: the replica runs without it.
                continue;
            };
            let _ = write!(
                x,
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{}'",
                escape(&image.to_string_lossy()),
                escape(&d.target)
            );
            if let Some(b) = &d.bus {
                let _ = write!(x, " bus='{}'", escape(b));
            }
            x.push_str("/>");
            if let Some(o) = d.boot_order {
                let _ = write!(x, "<boot order='{o}'/>");
            }
            x.push_str("</disk>");
        }
        for c in &self.controllers {
            let _ = write!(x, "<controller type='{}'", escape(&c.kind));
            if let Some(i) = c.index {
                let _ = write!(x, " index='{i}'");
            }
            if let Some(m) = &c.model {
                let _ = write!(x, " model='{}'", escape(m));
            }
            x.push_str("/>");
        }
        for n in &self.nics {
            let network = match t.networks {
                Networks::All(net) => net,
                Networks::Mapped(maps) => maps
                    .iter()
                    .find(|(from, _)| *from == n.network)
                    .map_or(n.network.as_str(), |(_, to)| to.as_str()),
            };
            x.push_str("<interface type='network'>");
            if let Some(m) = &n.mac {
                let _ = write!(x, "<mac address='{}'/>", escape(m));
            }
            let _ = write!(x, "<source network='{}'", escape(network));
            if let (Some(pg), Networks::Mapped(_)) = (&n.portgroup, t.networks) {
                let _ = write!(x, " portgroup='{}'", escape(pg));
            }
            x.push_str("/>");
            if let Some(m) = &n.model {
                let _ = write!(x, "<model type='{}'/>", escape(m));
            }
            if let Some(o) = n.boot_order {
                let _ = write!(x, "<boot order='{o}'/>");
            }
            x.push_str("</interface>");
        }
        if self.serial {
            let _ = write!(
                x,
                "<serial type='file'><source path='{}'/><target port='0'/></serial>",
                escape(&t.console.to_string_lossy())
            );
        }
        if self.guest_agent {
            x.push_str(
                "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>\
                 </channel>",
            );
        }
        for g in &self.graphics {
            let _ = write!(
                x,
                "<graphics type='{g}' autoport='yes'><listen type='address' \
                 address='127.0.0.1'/></graphics>"
            );
        }
        for p in &self.plain {
            render_plain(&mut x, p);
        }
        x.push_str("</devices>");
        for model in t.security_models.iter().filter(|m| m.as_str() != "none") {
            let _ = write!(
                x,
                "<seclabel type='dynamic' model='{}' relabel='yes'/>",
                escape(model)
            );
        }
        x.push_str("</domain>");
        Ok(x)
    }

    fn render_os(&self, x: &mut String) {
        let o = &self.os;
        x.push_str("<os");
        if let Some(f) = &o.firmware {
            let _ = write!(x, " firmware='{f}'");
        }
        x.push_str("><type");
        if let Some(a) = &o.arch {
            let _ = write!(x, " arch='{}'", escape(a));
        }
        if let Some(m) = &o.machine {
            let _ = write!(x, " machine='{}'", escape(m));
        }
        x.push_str(">hvm</type>");
        for (t, v) in [("kernel", &o.kernel), ("initrd", &o.initrd)] {
            if let Some(p) = v {
                let _ = write!(x, "<{t}>{}</{t}>", escape(&p.to_string_lossy()));
            }
        }
        if let Some(c) = &o.cmdline {
            let _ = write!(x, "<cmdline>{}</cmdline>", escape(c));
        }
        for b in &o.boot {
            let _ = write!(x, "<boot dev='{b}'/>");
        }
        x.push_str("</os>");
    }
}

fn render_plain(x: &mut String, p: &Plain) {
    let _ = write!(x, "<{}", p.tag);
    for (k, v) in &p.attrs {
        let _ = write!(x, " {k}='{}'", escape(v));
    }
    match &p.child {
        Some(c) => {
            let _ = write!(x, ">{c}</{}>", p.tag);
        }
        None => x.push_str("/>"),
    }
}

fn render_cpu(x: &mut String, c: &Cpu) {
    x.push_str("<cpu");
    for (k, v) in [("mode", &c.mode), ("match", &c.match_), ("check", &c.check)] {
        if let Some(v) = v {
            let _ = write!(x, " {k}='{}'", escape(v));
        }
    }
    x.push('>');
    if let Some((m, fallback)) = &c.model {
        x.push_str("<model");
        if let Some(f) = fallback {
            let _ = write!(x, " fallback='{f}'");
        }
        let _ = write!(x, ">{}</model>", escape(m));
    }
    if let Some(v) = &c.vendor {
        let _ = write!(x, "<vendor>{}</vendor>", escape(v));
    }
    if !c.topology.is_empty() {
        x.push_str("<topology");
        for (k, v) in &c.topology {
            let _ = write!(x, " {k}='{v}'");
        }
        x.push_str("/>");
    }
    for (policy, name) in &c.features {
        let _ = write!(
            x,
            "<feature policy='{}' name='{}'/>",
            escape(policy),
            escape(name)
        );
    }
    x.push_str("</cpu>");
}

fn parse_os(n: Node<'_, '_>) -> Res<Os> {
    attrs_only(n, "<os>", &["firmware"])?;
    let mut os = Os {
        firmware: n
            .attribute("firmware")
            .map(|f| one_of("<os firmware>", f, &["efi", "bios"]))
            .transpose()?,
        ..Os::default()
    };
    for c in elements(n) {
        let t = tag(c);
        let at = format!("<os><{t}>");
        match t {
            "type" => {
                attrs_only(c, &at, &["arch", "machine"])?;
                one_of(&at, text(c), &["hvm"])?;
                os.arch = c.attribute("arch").map(|v| token(&at, v)).transpose()?;
                os.machine = c.attribute("machine").map(|v| token(&at, v)).transpose()?;
            }
            "kernel" | "initrd" => {
                attrs_only(c, &at, &[])?;
                let p = Some(boot_path(&at, text(c))?);
                if t == "kernel" {
                    os.kernel = p;
                } else {
                    os.initrd = p;
                }
            }
            "cmdline" => {
                attrs_only(c, &at, &[])?;
                children_only(c, &at, &[])?;
                let v = c.text().unwrap_or("");
                if v.len() > MAX_CMDLINE || v.chars().any(char::is_control) {
                    return refuse(format!(
                        "{at} is longer than {MAX_CMDLINE} bytes or holds control characters"
                    ));
                }
                os.cmdline = Some(v.to_string());
            }
            "boot" => {
                attrs_only(c, &at, &["dev"])?;
                let dev = c.attribute("dev").unwrap_or("");
                os.boot.push(one_of(
                    &format!("{at} dev"),
                    dev,
                    &["hd", "cdrom", "network", "fd"],
                )?);
            }
            // A boot menu is the guest's own; nothing of the host.
            "bootmenu" => {}
            // With `firmware='efi'` libvirt fills in the firmware it chose and the domain's
            // NVRAM file (newer libvirt does so in the persistent definition too): the source
            // host's files, dropped. A replica or drill copy gets this site's firmware and an
            // NVRAM file of its own name, never the source's (a drill copy would write into
            // it, and its cleanup would delete it).
            "loader" | "nvram" | "firmware" if os.firmware.as_deref() == Some("efi") => {}
            // Otherwise `<loader>` and `<nvram>` name host files (firmware to run, a file to
            // write): a replica boots this site's firmware (`firmware='efi'`) with NVRAM
            // libvirt keeps.
            _ => {
                return refuse(format!(
                    "{at} is not allowed in a replicated definition{}",
                    if matches!(t, "loader" | "nvram") {
                        " (use <os firmware='efi'>: this site's firmware and NVRAM)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    if os.initrd.is_some() && os.kernel.is_none() {
        return refuse("<os><initrd> without <kernel>");
    }
    Ok(os)
}

fn parse_cpu(n: Node<'_, '_>) -> Res<Cpu> {
    attrs_only(n, "<cpu>", &["mode", "match", "check", "migratable"])?;
    children_only(n, "<cpu>", &["model", "vendor", "topology", "feature"])?;
    let opt = |attr: &str, allowed: &[&str]| {
        n.attribute(attr)
            .map(|v| one_of(&format!("<cpu {attr}>"), v, allowed))
            .transpose()
    };
    let mut cpu = Cpu {
        mode: opt(
            "mode",
            &["custom", "host-model", "host-passthrough", "maximum"],
        )?,
        match_: opt("match", &["minimum", "exact", "strict"])?,
        check: opt("check", &["none", "partial", "full"])?,
        ..Cpu::default()
    };
    for c in elements(n) {
        let t = tag(c);
        let at = format!("<cpu><{t}>");
        match t {
            "model" => {
                attrs_only(c, &at, &["fallback"])?;
                let fallback = c
                    .attribute("fallback")
                    .map(|f| one_of(&at, f, &["allow", "forbid"]))
                    .transpose()?;
                cpu.model = Some((token(&at, text(c))?, fallback));
            }
            "vendor" => cpu.vendor = Some(token(&at, text(c))?),
            "topology" => {
                attrs_only(c, &at, &["sockets", "dies", "clusters", "cores", "threads"])?;
                for a in c.attributes() {
                    let v: u32 = number(&format!("{at} {}", a.name()), a.value())?;
                    if v == 0 || v as usize > MAX_ITEMS {
                        return refuse(format!("{at} {}='{v}' is out of range", a.name()));
                    }
                    cpu.topology.push((a.name().to_string(), v));
                }
            }
            _ => {
                attrs_only(c, &at, &["policy", "name"])?;
                let policy = one_of(
                    &format!("{at} policy"),
                    c.attribute("policy").unwrap_or("require"),
                    &["force", "require", "optional", "disable", "forbid"],
                )?;
                let name = token(&format!("{at} name"), c.attribute("name").unwrap_or(""))?;
                if cpu.features.len() >= MAX_ITEMS {
                    return refuse(format!("<cpu> has more than {MAX_ITEMS} features"));
                }
                cpu.features.push((policy, name));
            }
        }
    }
    Ok(cpu)
}

fn parse_clock(n: Node<'_, '_>) -> Res<Clock> {
    attrs_only(n, "<clock>", &["offset"])?;
    children_only(n, "<clock>", &["timer"])?;
    let mut clock = Clock {
        offset: one_of(
            "<clock offset>",
            n.attribute("offset").unwrap_or("utc"),
            &["utc", "localtime"],
        )?,
        timers: Vec::new(),
    };
    for t in elements(n) {
        attrs_only(t, "<clock><timer>", &["name", "tickpolicy", "present"])?;
        children_only(t, "<clock><timer>", &[])?;
        let mut attrs = vec![(
            "name".to_string(),
            one_of(
                "<clock><timer> name",
                t.attribute("name").unwrap_or(""),
                &["rtc", "pit", "hpet", "kvmclock", "hypervclock", "tsc"],
            )?,
        )];
        if let Some(p) = t.attribute("tickpolicy") {
            let v = one_of(
                "<clock><timer> tickpolicy",
                p,
                &["delay", "catchup", "merge", "discard"],
            )?;
            attrs.push(("tickpolicy".into(), v));
        }
        if let Some(p) = t.attribute("present") {
            let v = one_of("<clock><timer> present", p, &["yes", "no"])?;
            attrs.push(("present".into(), v));
        }
        if clock.timers.len() >= MAX_ITEMS {
            return refuse("<clock> has too many timers");
        }
        clock.timers.push(Plain {
            tag: "timer".into(),
            attrs,
            child: None,
        });
    }
    Ok(clock)
}

/// A `<seclabel>` may only ask for what a replica gets anyway: a dynamic label, relabelled.
fn check_seclabel(n: Node<'_, '_>) -> Res<()> {
    attrs_only(n, "<seclabel>", &["type", "model", "relabel"])?;
    // `label` and `imagelabel` are libvirt's report of a dynamic label; never used here.
    children_only(n, "<seclabel>", &["label", "imagelabel"])?;
    let ty = n.attribute("type").unwrap_or("dynamic");
    if ty != "dynamic" {
        return refuse(format!(
            "<seclabel type='{ty}'> is not allowed: a replica runs confined, with a dynamic label"
        ));
    }
    if let Some(r) = n.attribute("relabel")
        && r != "yes"
    {
        return refuse(format!("<seclabel relabel='{r}'> is not allowed"));
    }
    if let Some(m) = n.attribute("model") {
        token("<seclabel model>", m)?;
    }
    Ok(())
}

/// Elements libvirt adds to a device for itself (its PCI address, its alias): dropped, libvirt
/// assigns them again.
const BOOKKEEPING: &[&str] = &["address", "alias"];

fn with_bookkeeping<'a>(allowed: &[&'a str]) -> Vec<&'a str> {
    let mut v = allowed.to_vec();
    v.extend_from_slice(BOOKKEEPING);
    v
}

fn boot_order(c: Node<'_, '_>, at: &str) -> Res<u32> {
    attrs_only(c, at, &["order"])?;
    let o: u32 = number(&format!("{at} order"), c.attribute("order").unwrap_or(""))?;
    if o == 0 || o as usize > MAX_ITEMS {
        return refuse(format!("{at} order {o} is out of range"));
    }
    Ok(o)
}

fn parse_devices(n: Node<'_, '_>, spec: &mut DomainSpec) -> Res<()> {
    attrs_only(n, "<devices>", &[])?;
    if elements(n).count() > MAX_ITEMS {
        return refuse(format!("<devices> holds more than {MAX_ITEMS} devices"));
    }
    for d in elements(n) {
        let t = tag(d);
        if d.tag_name().namespace().is_some() {
            return refuse(format!("<devices><{t}> of another XML namespace"));
        }
        match t {
            // The program libvirt runs as QEMU is this site's choice (its default).
            "emulator" => {}
            "disk" => spec.disks.extend(parse_disk(d)?),
            "controller" => {
                attrs_only(
                    d,
                    "<controller>",
                    &["type", "index", "model", "ports", "vectors"],
                )?;
                // `<model name>`, `<target chassis port>` of PCI controllers, and `<driver>`
                // tuning: libvirt picks them again.
                children_only(
                    d,
                    "<controller>",
                    &with_bookkeeping(&["model", "target", "driver"]),
                )?;
                let kind = one_of(
                    "<controller type>",
                    d.attribute("type").unwrap_or(""),
                    &["usb", "pci", "ide", "sata", "scsi", "virtio-serial", "fdc"],
                )?;
                let index = d
                    .attribute("index")
                    .map(|i| number("<controller index>", i))
                    .transpose()?;
                let model = d
                    .attribute("model")
                    .map(|m| token("<controller model>", m))
                    .transpose()?;
                spec.controllers.push(Controller { kind, index, model });
            }
            "interface" => spec.nics.push(parse_nic(d)?),
            "serial" | "console" => {
                let at = format!("<{t}>");
                attrs_only(d, &at, &["type"])?;
                let ty = d.attribute("type").unwrap_or("");
                // Only consoles that reach no host file, device or socket of the peer's
                // choosing: the replica's serial console writes the agent's file.
                one_of(&format!("{at} type"), ty, &["file", "pty", "null"])?;
                children_only(d, &at, &with_bookkeeping(&["source", "target"]))?;
                for c in elements(d) {
                    match tag(c) {
                        "source" => attrs_only(c, &format!("{at}<source>"), &["path", "append"])?,
                        "target" => {
                            attrs_only(c, &format!("{at}<target>"), &["type", "port"])?;
                            children_only(c, &format!("{at}<target>"), &["model"])?;
                        }
                        _ => {}
                    }
                }
                if t == "serial" {
                    if spec.serial {
                        return refuse("a second <serial> is not allowed");
                    }
                    spec.serial = true;
                }
            }
            "channel" => {
                attrs_only(d, "<channel>", &["type"])?;
                one_of(
                    "<channel type>",
                    d.attribute("type").unwrap_or(""),
                    &["unix"],
                )?;
                children_only(d, "<channel>", &with_bookkeeping(&["source", "target"]))?;
                let target = elements(d).find(|c| tag(*c) == "target");
                let name = target.and_then(|c| c.attribute("name"));
                if name != Some("org.qemu.guest_agent.0")
                    || target.and_then(|c| c.attribute("type")) != Some("virtio")
                {
                    return refuse(
                        "<channel>: only the guest agent's (virtio, org.qemu.guest_agent.0)",
                    );
                }
                for c in elements(d) {
                    match tag(c) {
                        // The socket is libvirt's own at the replica; the peer's path is dropped.
                        "source" => {
                            attrs_only(c, "<channel><source>", &["mode", "path"])?;
                            one_of(
                                "<channel><source> mode",
                                c.attribute("mode").unwrap_or("bind"),
                                &["bind"],
                            )?;
                        }
                        "target" => {
                            attrs_only(c, "<channel><target>", &["type", "name", "state"])?;
                        }
                        _ => {}
                    }
                }
                spec.guest_agent = true;
            }
            "input" => {
                // An `evdev` or `passthrough` input is a host input device.
                let mut attrs = vec![(
                    "type".to_string(),
                    one_of(
                        "<input type>",
                        d.attribute("type").unwrap_or(""),
                        &["mouse", "keyboard", "tablet"],
                    )?,
                )];
                attrs_only(d, "<input>", &["type", "bus"])?;
                children_only(d, "<input>", BOOKKEEPING)?;
                if let Some(b) = d.attribute("bus") {
                    attrs.push((
                        "bus".into(),
                        one_of("<input bus>", b, &["ps2", "usb", "virtio"])?,
                    ));
                }
                spec.plain.push(Plain {
                    tag: "input".into(),
                    attrs,
                    child: None,
                });
            }
            "graphics" => {
                let ty = one_of(
                    "<graphics type>",
                    d.attribute("type").unwrap_or(""),
                    &["vnc", "spice"],
                )?;
                attrs_only(
                    d,
                    "<graphics>",
                    &["type", "port", "autoport", "listen", "keymap", "tlsPort"],
                )?;
                children_only(d, "<graphics>", &["listen"])?;
                let mut listens: Vec<&str> = d.attribute("listen").into_iter().collect();
                for l in elements(d) {
                    one_of(
                        "<graphics><listen> type",
                        l.attribute("type").unwrap_or("address"),
                        &["address"],
                    )?;
                    attrs_only(l, "<graphics><listen>", &["type", "address"])?;
                    listens.push(l.attribute("address").unwrap_or(""));
                }
                if let Some(bad) = listens.iter().find(|a| !loopback(a)) {
                    return refuse(format!(
                        "<graphics> listening on {bad:?} is not allowed: only the loopback \
                         address"
                    ));
                }
                spec.graphics.push(ty);
            }
            "video" => {
                attrs_only(d, "<video>", &[])?;
                children_only(d, "<video>", &with_bookkeeping(&["model"]))?;
                let model = elements(d).find(|c| tag(*c) == "model");
                let ty = model.and_then(|m| m.attribute("type")).unwrap_or("");
                let ty = one_of(
                    "<video><model type>",
                    ty,
                    &["vga", "cirrus", "virtio", "qxl", "bochs", "ramfb", "none"],
                )?;
                spec.plain.push(Plain {
                    tag: "video".into(),
                    attrs: vec![],
                    child: Some(format!("<model type='{ty}'/>")),
                });
            }
            "memballoon" => {
                attrs_only(d, "<memballoon>", &["model", "autodeflate"])?;
                children_only(d, "<memballoon>", &with_bookkeeping(&["stats"]))?;
                let model = one_of(
                    "<memballoon model>",
                    d.attribute("model").unwrap_or(""),
                    &["virtio", "none"],
                )?;
                spec.plain.push(Plain {
                    tag: "memballoon".into(),
                    attrs: vec![("model".into(), model)],
                    child: None,
                });
            }
            // libvirt's record that the guest has no sound output; it adds it again.
            "audio" => {
                attrs_only(d, "<audio>", &["id", "type"])?;
                one_of("<audio type>", d.attribute("type").unwrap_or(""), &["none"])?;
            }
            "rng" => {
                attrs_only(d, "<rng>", &["model"])?;
                one_of(
                    "<rng model>",
                    d.attribute("model").unwrap_or(""),
                    &["virtio"],
                )?;
                children_only(d, "<rng>", &with_bookkeeping(&["backend", "rate"]))?;
                for b in elements(d).filter(|c| tag(*c) == "backend") {
                    one_of(
                        "<rng><backend> model",
                        b.attribute("model").unwrap_or(""),
                        &["random"],
                    )?;
                    attrs_only(b, "<rng><backend>", &["model"])?;
                    one_of(
                        "<rng><backend>",
                        text(b),
                        &["", "/dev/urandom", "/dev/random"],
                    )?;
                }
                spec.plain.push(Plain {
                    tag: "rng".into(),
                    attrs: vec![("model".into(), "virtio".into())],
                    child: Some("<backend model='random'>/dev/urandom</backend>".into()),
                });
            }
            "watchdog" => {
                attrs_only(d, "<watchdog>", &["model", "action"])?;
                children_only(d, "<watchdog>", BOOKKEEPING)?;
                let model = one_of(
                    "<watchdog model>",
                    d.attribute("model").unwrap_or(""),
                    &["i6300esb", "ib700", "itco"],
                )?;
                // `dump` writes a core file into a host directory.
                let action = one_of(
                    "<watchdog action>",
                    d.attribute("action").unwrap_or("reset"),
                    &[
                        "reset",
                        "shutdown",
                        "poweroff",
                        "pause",
                        "none",
                        "inject-nmi",
                    ],
                )?;
                spec.plain.push(Plain {
                    tag: "watchdog".into(),
                    attrs: vec![("model".into(), model), ("action".into(), action)],
                    child: None,
                });
            }
            "sound" => {
                attrs_only(d, "<sound>", &["model"])?;
                children_only(d, "<sound>", &with_bookkeeping(&["codec"]))?;
                let model = one_of(
                    "<sound model>",
                    d.attribute("model").unwrap_or(""),
                    &["ich6", "ich9", "ac97", "es1370", "sb16"],
                )?;
                spec.plain.push(Plain {
                    tag: "sound".into(),
                    attrs: vec![("model".into(), model)],
                    child: None,
                });
            }
            "tpm" => {
                attrs_only(d, "<tpm>", &["model"])?;
                children_only(d, "<tpm>", &with_bookkeeping(&["backend"]))?;
                let model = one_of(
                    "<tpm model>",
                    d.attribute("model").unwrap_or("tpm-tis"),
                    &["tpm-tis", "tpm-crb"],
                )?;
                let backend = elements(d).find(|c| tag(*c) == "backend");
                let ty = backend.and_then(|b| b.attribute("type")).unwrap_or("");
                // A passthrough TPM is the host's own.
                one_of("<tpm><backend type>", ty, &["emulator"])?;
                let b = backend.ok_or_else(|| Refused("<tpm> without <backend>".into()))?;
                attrs_only(b, "<tpm><backend>", &["type", "version"])?;
                children_only(b, "<tpm><backend>", &[])?;
                let version = one_of(
                    "<tpm><backend> version",
                    b.attribute("version").unwrap_or("2.0"),
                    &["1.2", "2.0"],
                )?;
                spec.plain.push(Plain {
                    tag: "tpm".into(),
                    attrs: vec![("model".into(), model)],
                    child: Some(format!("<backend type='emulator' version='{version}'/>")),
                });
            }
            "panic" => {
                attrs_only(d, "<panic>", &["model"])?;
                children_only(d, "<panic>", BOOKKEEPING)?;
                let mut attrs = vec![];
                if let Some(m) = d.attribute("model") {
                    attrs.push((
                        "model".into(),
                        one_of("<panic model>", m, &["isa", "hyperv", "pseries", "s390"])?,
                    ));
                }
                spec.plain.push(Plain {
                    tag: "panic".into(),
                    attrs,
                    child: None,
                });
            }
            // Host devices, host directories, host files (nvdimm, shared memory, parallel
            // ports), smartcards and USB redirection: all reach the host itself.
            _ => {
                return refuse(format!(
                    "<devices><{t}> is not allowed in a replicated definition"
                ));
            }
        }
    }
    Ok(())
}

/// A replicated disk, or `None` for a removable-media drive (left out: its media is the
/// source host's).
fn parse_disk(d: Node<'_, '_>) -> Res<Option<Disk>> {
    let target = elements(d).find(|c| tag(*c) == "target");
    let dev = target.and_then(|t| t.attribute("dev")).unwrap_or("");
    let at = format!("<disk> {dev:?}");
    if matches!(d.attribute("device"), Some("cdrom" | "floppy")) {
        return Ok(None);
    }
    attrs_only(d, &at, &["type", "device"])?;
    // A replicated disk is a file at the source and the agent's own image here: anything else
    // (no type, a block device, a volume, a directory, NVMe, network storage, a CD-ROM) is not.
    match d.attribute("type") {
        Some("file") => {}
        Some(other) => {
            return refuse(format!(
                "{at}: type '{other}' is not allowed (only type='file', which becomes the \
                 replica's image)"
            ));
        }
        None => return refuse(format!("{at}: the type attribute is missing")),
    }
    let device = d.attribute("device").unwrap_or("disk");
    if device != "disk" {
        return refuse(format!(
            "{at}: device '{device}' is not allowed (only 'disk', 'cdrom', 'floppy')"
        ));
    }
    children_only(
        d,
        &at,
        &with_bookkeeping(&["driver", "source", "target", "boot"]),
    )?;
    let mut disk = Disk {
        target: crate::agent::input::valid_name(dev)
            .then(|| dev.to_string())
            .ok_or_else(|| Refused(format!("{at}: <target dev> is not a disk name")))?,
        bus: None,
        boot_order: None,
    };
    for c in elements(d) {
        match tag(c) {
            // Only the format and cache tuning of the source's image: the replica's is qcow2.
            "driver" => {
                attrs_only(
                    c,
                    &format!("{at}<driver>"),
                    &["name", "type", "cache", "io", "discard", "detect_zeroes"],
                )?;
                children_only(c, &format!("{at}<driver>"), &[])?;
            }
            // The source's path is replaced by the replica's image; it may carry nothing else.
            "source" => {
                attrs_only(c, &format!("{at}<source>"), &["file", "index"])?;
                children_only(c, &format!("{at}<source>"), &[])?;
            }
            "target" => {
                attrs_only(c, &format!("{at}<target>"), &["dev", "bus"])?;
                disk.bus = c
                    .attribute("bus")
                    .map(|b| {
                        one_of(
                            &format!("{at}<target bus>"),
                            b,
                            &["virtio", "sata", "scsi", "ide", "usb"],
                        )
                    })
                    .transpose()?;
            }
            "boot" => disk.boot_order = Some(boot_order(c, &format!("{at}<boot>"))?),
            _ => {}
        }
    }
    Ok(Some(disk))
}

fn parse_nic(d: Node<'_, '_>) -> Res<Nic> {
    let ty = d.attribute("type").unwrap_or("");
    if ty != "network" {
        return refuse(format!(
            "<interface type='{ty}'> is not allowed (only type='network', on this site's \
             libvirt networks)"
        ));
    }
    attrs_only(d, "<interface>", &["type"])?;
    children_only(
        d,
        "<interface>",
        &with_bookkeeping(&["mac", "source", "model", "boot"]),
    )?;
    let mut nic = Nic {
        mac: None,
        network: String::new(),
        portgroup: None,
        model: None,
        boot_order: None,
    };
    for c in elements(d) {
        match tag(c) {
            "mac" => {
                attrs_only(c, "<interface><mac>", &["address"])?;
                nic.mac = Some(mac(c.attribute("address").unwrap_or(""))?);
            }
            "source" => {
                attrs_only(c, "<interface><source>", &["network", "portgroup"])?;
                let net = c.attribute("network").unwrap_or("");
                if !crate::agent::input::valid_name(net) {
                    return refuse(format!(
                        "<interface><source network='{net}'> is not a network name"
                    ));
                }
                nic.network = net.to_string();
                nic.portgroup = c
                    .attribute("portgroup")
                    .map(|p| token("<interface><source portgroup>", p))
                    .transpose()?;
            }
            "model" => {
                attrs_only(c, "<interface><model>", &["type"])?;
                nic.model = Some(one_of(
                    "<interface><model type>",
                    c.attribute("type").unwrap_or(""),
                    &[
                        "virtio", "e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet", "vmxnet3",
                    ],
                )?);
            }
            "boot" => nic.boot_order = Some(boot_order(c, "<interface><boot>")?),
            _ => {}
        }
    }
    if nic.network.is_empty() {
        return refuse("<interface type='network'> without <source network>");
    }
    Ok(nic)
}

/// Whether `file` (a kernel or initrd the peer names) is a file inside one of `dirs` (the
/// agent's `--boot-file-dir`), symbolic links resolved.
fn boot_file_allowed(file: &Path, dirs: &[PathBuf]) -> bool {
    let Ok(real) = std::fs::canonicalize(file) else {
        return false;
    };
    real.is_file()
        && dirs
            .iter()
            .any(|d| std::fs::canonicalize(d).is_ok_and(|d| real.starts_with(&d) && real != d))
}

/// A peer's definition of VM `vm` whose replicated disks are `disks`, checked where it
/// arrives: the allowlist, its name, every disk one of the replicated ones, every boot file
/// inside `boot_dirs`.
pub fn check(definition: &str, vm: &str, disks: &[&str], boot_dirs: &[PathBuf]) -> Res<DomainSpec> {
    let spec = DomainSpec::parse(definition)?;
    if spec.name != vm {
        return refuse(format!("<name> is {:?}, not {vm:?}", spec.name));
    }
    for d in &spec.disks {
        if !disks.contains(&d.target.as_str()) {
            return refuse(format!(
                "<disk> {:?} is not one of the VM's replicated disks",
                d.target
            ));
        }
    }
    for (what, file) in [("kernel", &spec.os.kernel), ("initrd", &spec.os.initrd)] {
        if let Some(f) = file
            && !boot_file_allowed(f, boot_dirs)
        {
            return refuse(format!(
                "<os><{what}> {} is not a file in this site's boot file directories \
                 (agent flag --boot-file-dir)",
                f.display()
            ));
        }
    }
    Ok(spec)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A definition as libvirt writes the test guest's back, with `extra` in `<devices>` and
    /// `os` in `<os>`.
    fn def(extra: &str, os: &str) -> String {
        format!(
            "<domain type='qemu'><name>web</name><memory unit='MiB'>192</memory>\
             <vcpu placement='static'>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type>{os}</os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/src/web.qcow2'/><target dev='vda' bus='virtio'/></disk>\
             <serial type='file'><source path='/src/c.log'/><target port='0'/></serial>\
             {extra}</devices></domain>"
        )
    }

    fn refused(definition: &str) -> String {
        match DomainSpec::parse(definition) {
            Ok(spec) => panic!("accepted: {spec:?}\n{definition}"),
            Err(Refused(why)) => why,
        }
    }

    #[test]
    fn the_test_guest_is_read() {
        let spec = DomainSpec::parse(&def("", "")).expect("reads");
        assert_eq!(spec.memory_kib, 192 << 10);
        assert_eq!(spec.disks.len(), 1);
        assert!(spec.serial);
    }

    /// Every hostile piece of a definition is refused, and the reason names it.
    #[test]
    fn hostile_definitions_are_refused_naming_what_is_wrong() {
        let cases: &[(&str, &str, &str)] = &[
            // A disk with no type (libvirt reads it as a file) on a host file.
            (
                "<disk device='disk'><source file='/etc/shadow'/><target dev='vdb'/></disk>",
                "",
                "type attribute is missing",
            ),
            (
                "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdb'/></disk>",
                "",
                "type 'volume'",
            ),
            (
                "<disk type='dir' device='disk'><source dir='/etc'/><target dev='vdb'/></disk>",
                "",
                "type 'dir'",
            ),
            (
                "<disk type='nvme' device='disk'><source type='pci' namespace='1'/><target dev='vdb'/></disk>",
                "",
                "type 'nvme'",
            ),
            (
                "<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='evil'/></source><target dev='vdb'/></disk>",
                "",
                "type 'network'",
            ),
            (
                "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb'/></disk>",
                "",
                "type 'block'",
            ),
            (
                "<disk type='file' device='lun'><source file='/etc/shadow'/><target dev='sda'/></disk>",
                "",
                "device 'lun'",
            ),
            (
                "<disk type='file' device='disk'><source file='/x'/><backingStore type='file'><source file='/etc/shadow'/></backingStore><target dev='vdb'/></disk>",
                "",
                "<backingStore>",
            ),
            (
                "<disk type='file' device='disk'><source file='/x'><seclabel model='dac' relabel='no'/></source><target dev='vdb'/></disk>",
                "",
                "<seclabel>",
            ),
            (
                "<interface type='hostdev'><source><address type='pci' bus='1'/></source></interface>",
                "",
                "<interface type='hostdev'>",
            ),
            (
                "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>",
                "",
                "<interface type='direct'>",
            ),
            (
                "<interface type='vhostuser'><source type='unix' path='/run/x' mode='client'/></interface>",
                "",
                "<interface type='vhostuser'>",
            ),
            (
                "<interface type='ethernet'><script path='/tmp/x'/></interface>",
                "",
                "<interface type='ethernet'>",
            ),
            (
                "<interface type='network'><source network='lan'/><script path='/tmp/x'/></interface>",
                "",
                "<script>",
            ),
            (
                "<interface type='network'><source network='lan'/><rom file='/etc/shadow'/></interface>",
                "",
                "<rom>",
            ),
            (
                "<parallel type='file'><source path='/etc/cron.d/x'/></parallel>",
                "",
                "<parallel>",
            ),
            (
                "<channel type='file'><source path='/etc/x'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
                "",
                "<channel type>='file'",
            ),
            (
                "<console type='dev'><source path='/dev/ttyS0'/></console>",
                "",
                "<console> type='dev'",
            ),
            (
                "<console type='pipe'><source path='/tmp/p'/></console>",
                "",
                "<console> type='pipe'",
            ),
            (
                "<console type='tcp'><source mode='bind' host='0.0.0.0' service='2445'/></console>",
                "",
                "<console> type='tcp'",
            ),
            (
                "<console type='file'><source path='/x'/><log file='/etc/shadow'/></console>",
                "",
                "<log>",
            ),
            (
                "<channel type='unix'><source mode='connect' path='/run/x'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
                "",
                "mode='connect'",
            ),
            (
                "<channel type='unix'><target type='virtio' name='com.evil'/></channel>",
                "",
                "only the guest agent's",
            ),
            (
                "<memory model='nvdimm'><source><path>/dev/pmem0</path></source><target><size unit='MiB'>64</size></target></memory>",
                "",
                "<devices><memory>",
            ),
            (
                "<nvram><address type='spapr-vio'/></nvram>",
                "",
                "<devices><nvram>",
            ),
            (
                "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>",
                "",
                "<tpm><backend type>='passthrough'",
            ),
            (
                "<input type='evdev'><source dev='/dev/input/event0'/></input>",
                "",
                "<input type>='evdev'",
            ),
            (
                "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>",
                "",
                "<input type>='passthrough'",
            ),
            (
                "<graphics type='vnc' port='5900' listen='0.0.0.0'/>",
                "",
                "listening on \"0.0.0.0\"",
            ),
            (
                "<graphics type='spice' autoport='yes'><listen type='address' address='::'/></graphics>",
                "",
                "listening on \"::\"",
            ),
            (
                "<graphics type='vnc'><listen type='network' network='default'/></graphics>",
                "",
                "<graphics><listen> type='network'",
            ),
            (
                "<graphics type='vnc' socket='/etc/x'/>",
                "",
                "attribute 'socket'",
            ),
            (
                "<hostdev mode='subsystem' type='pci'/>",
                "",
                "<devices><hostdev>",
            ),
            (
                "<filesystem type='mount'><source dir='/'/><target dir='r'/></filesystem>",
                "",
                "<devices><filesystem>",
            ),
            (
                "<smartcard mode='passthrough' type='tcp'/>",
                "",
                "<devices><smartcard>",
            ),
            (
                "<redirdev bus='usb' type='tcp'/>",
                "",
                "<devices><redirdev>",
            ),
            ("<shmem name='x'/>", "", "<devices><shmem>"),
            (
                "<rng model='virtio'><backend model='egd' type='tcp'/></rng>",
                "",
                "<rng><backend> model='egd'",
            ),
            (
                "<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>",
                "",
                "<rng><backend>='/dev/sda'",
            ),
            (
                "<watchdog model='i6300esb' action='dump'/>",
                "",
                "<watchdog action>='dump'",
            ),
            (
                "",
                "<loader readonly='yes' type='pflash'>/etc/evil.fd</loader>",
                "<os><loader>",
            ),
            ("", "<nvram>/etc/shadow</nvram>", "<os><nvram>"),
            ("", "<dtb>/etc/x</dtb>", "<os><dtb>"),
            (
                "",
                "<acpi><table type='slic'>/etc/x</table></acpi>",
                "<os><acpi>",
            ),
            ("", "<kernel>../../etc/x</kernel>", "not an absolute path"),
            (
                "",
                "<kernel>/boot/../etc/x</kernel>",
                "not an absolute path",
            ),
            ("", "<initrd>/x/initrd</initrd>", "without <kernel>"),
        ];
        for (devices, os, says) in cases {
            let why = refused(&def(devices, os));
            assert!(
                why.contains(says),
                "{devices}{os}: {why:?} does not say {says:?}"
            );
        }
        for (root, says) in [
            ("<seclabel type='none'/>", "<seclabel type='none'>"),
            (
                "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>",
                "<seclabel type='static'>",
            ),
            (
                "<seclabel type='dynamic' model='dac' relabel='no'/>",
                "relabel='no'",
            ),
            (
                "<seclabel type='dynamic' model='selinux'><baselabel>system_u:system_r:unconfined_t:s0</baselabel></seclabel>",
                "<baselabel>",
            ),
            (
                "<memoryBacking><hugepages/></memoryBacking>",
                "<memoryBacking>",
            ),
            ("<sysinfo type='smbios'/>", "<sysinfo>"),
            ("<idmap/>", "<idmap>"),
            (
                "<on_lockfailure>poweroff</on_lockfailure>",
                "<on_lockfailure>",
            ),
        ] {
            let d = def("", "").replace("</devices>", &format!("</devices>{root}"));
            let why = refused(&d);
            assert!(why.contains(says), "{root}: {why:?} does not say {says:?}");
        }
        let qemu_args = def("", "")
            .replace(
                "<domain type='qemu'>",
                "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
            )
            .replace(
                "</devices>",
                "</devices><qemu:commandline><qemu:arg value='-x'/></qemu:commandline>",
            );
        assert!(refused(&qemu_args).contains("another XML namespace"));
        assert!(refused("<domain type='xen'><name>w</name></domain>").contains("type"));
        assert!(refused("<domain").contains("not XML"));
    }

    #[test]
    fn what_is_accepted_reaches_the_replica_as_this_site_chooses() {
        let d = def(
            "<graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'/>\
             <graphics type='spice'><listen type='address' address='::1'/></graphics>\
             <console type='file'><source path='/etc/shadow'/><target type='serial' port='0'/></console>\
             <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\
             <rng model='virtio'><backend model='random'>/dev/random</backend></rng>\
             <disk type='file' device='cdrom'><source file='/etc/shadow'/><target dev='sda'/></disk>",
            "<kernel>/boot/k</kernel>",
        )
        .replace("<source path='/src/c.log'/>", "<source path='/etc/passwd'/>");
        let spec = DomainSpec::parse(&d).expect("reads");
        let images = vec![("vda".to_string(), PathBuf::from("/data/vda.qcow2"))];
        let out = spec
            .render(&Target {
                name: "web",
                keep_uuid: true,
                domain_type: Some("kvm"),
                images: &images,
                console: Path::new("/data/console.log"),
                networks: Networks::Mapped(&[]),
                security_models: &[],
            })
            .expect("renders");
        assert!(out.starts_with("<domain type='kvm'>"), "{out}");
        for gone in [
            "/etc/",
            "/src/",
            "5901",
            "/dev/random",
            "autoport='no'",
            "<console",
        ] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert_eq!(
            out.matches("address='127.0.0.1'").count(),
            2,
            "every console listens on the loopback address: {out}"
        );
        assert!(out.contains("<kernel>/boot/k</kernel>"), "{out}");
        assert!(out.contains("<source path='/data/console.log'/>"), "{out}");
    }

    #[test]
    fn a_definition_is_checked_against_the_vm_its_disks_and_the_boot_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let boot = dir.path().join("boot");
        std::fs::create_dir(&boot).expect("mkdir");
        std::fs::write(boot.join("vmlinuz"), b"k").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", boot.join("link")).expect("symlink");
        let dirs = vec![boot.clone()];
        let with_kernel = |k: &Path| def("", &format!("<kernel>{}</kernel>", k.display()));
        assert!(check(&with_kernel(&boot.join("vmlinuz")), "web", &["vda"], &dirs).is_ok());
        for (d, vm, disks, says) in [
            (
                with_kernel(&boot.join("vmlinuz")),
                "db",
                &["vda"][..],
                "<name>",
            ),
            (
                def("", ""),
                "web",
                &["vdb"][..],
                "not one of the VM's replicated disks",
            ),
            (
                with_kernel(Path::new("/etc/passwd")),
                "web",
                &["vda"][..],
                "<os><kernel>",
            ),
            (
                with_kernel(&boot.join("link")),
                "web",
                &["vda"][..],
                "--boot-file-dir",
            ),
            (
                with_kernel(&boot.join("missing")),
                "web",
                &["vda"][..],
                "--boot-file-dir",
            ),
        ] {
            let Refused(why) = check(&d, vm, disks, &dirs).unwrap_err();
            assert!(why.contains(says), "{why:?} does not say {says:?}");
        }
        let Refused(why) =
            check(&with_kernel(&boot.join("vmlinuz")), "web", &["vda"], &[]).unwrap_err();
        assert!(why.contains("--boot-file-dir"), "{why}");
    }
}

/// Fuzzing of the allowlist (see `crate::fuzz`): the test guest's definition with made-up
/// elements and attributes put anywhere, or damaged bytes. The parser never panics, and what
/// it accepts renders a definition that names no host path but the agent's own, has only
/// network NICs and loopback consoles, and reads back to the same subset.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::{Index, select};

    use super::*;

    const BASE: &str = "<domain type='qemu'><name>web</name><memory unit='MiB'>192</memory>\
        <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><kernel>/g/k</kernel>\
        </os><features><acpi/></features><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
        <source file='/src/web.qcow2'/><target dev='vda' bus='virtio'/></disk>\
        <interface type='network'><source network='lan'/><model type='virtio'/></interface>\
        <serial type='file'><source path='/src/c.log'/><target port='0'/></serial>\
        </devices></domain>";

    const TAGS: &[&str] = &[
        "disk",
        "source",
        "target",
        "driver",
        "interface",
        "serial",
        "console",
        "channel",
        "hostdev",
        "backingStore",
        "loader",
        "nvram",
        "seclabel",
        "graphics",
        "listen",
        "input",
        "tpm",
        "backend",
        "memory",
        "rng",
        "video",
        "model",
        "boot",
        "kernel",
        "initrd",
        "cmdline",
        "qemu:arg",
        "label",
        "baselabel",
        "script",
        "controller",
        "address",
        "mac",
        "filesystem",
        "log",
        "emulator",
        "audio",
        "watchdog",
    ];
    const ATTRS: &[&str] = &[
        "type",
        "device",
        "file",
        "path",
        "dev",
        "network",
        "listen",
        "address",
        "model",
        "relabel",
        "mode",
        "name",
        "bus",
        "port",
        "autoport",
        "socket",
        "action",
        "state",
        "portgroup",
        "index",
        "order",
    ];
    const VALUES: &[&str] = &[
        "file",
        "network",
        "block",
        "volume",
        "dir",
        "nvme",
        "hostdev",
        "direct",
        "vhostuser",
        "/etc/shadow",
        "/dev/sda",
        "0.0.0.0",
        "127.0.0.1",
        "::",
        "none",
        "dynamic",
        "static",
        "no",
        "yes",
        "vda",
        "vdb",
        "virtio",
        "unix",
        "tcp",
        "pipe",
        "dev",
        "emulator",
        "passthrough",
        "evdev",
        "org.qemu.guest_agent.0",
        "lan",
        "bind",
        "connect",
        "disk",
        "cdrom",
        "vnc",
        "spice",
        "random",
        "1",
        "0",
        "52:54:00:00:00:01",
        "x'y",
        "a&b",
    ];

    fn element() -> impl Strategy<Value = String> {
        let leaf = (
            select(TAGS),
            vec((select(ATTRS), select(VALUES)), 0..3),
            proptest::option::of(select(VALUES)),
        )
            .prop_map(|(t, attrs, text)| {
                let mut s = format!("<{t}");
                for (a, v) in attrs {
                    s.push_str(&format!(" {a}='{}'", escape(v)));
                }
                match text {
                    Some(v) => s.push_str(&format!(">{}</{t}>", escape(v))),
                    None => s.push_str("/>"),
                }
                s
            });
        leaf.prop_recursive(3, 12, 3, |inner| {
            (
                select(TAGS),
                vec((select(ATTRS), select(VALUES)), 0..3),
                vec(inner, 1..3),
            )
                .prop_map(|(t, attrs, kids)| {
                    let mut s = format!("<{t}");
                    for (a, v) in attrs {
                        s.push_str(&format!(" {a}='{}'", escape(v)));
                    }
                    s.push('>');
                    s.extend(kids);
                    s.push_str(&format!("</{t}>"));
                    s
                })
        })
    }

    /// The base with `inserts` put after the `>` of tags picked by their index, and `damage`
    /// (index, byte) written over it.
    fn definition() -> impl Strategy<Value = String> {
        (
            vec((any::<Index>(), element()), 0..4),
            vec((any::<Index>(), any::<u8>()), 0..2),
        )
            .prop_map(|(inserts, damage)| {
                let ends: Vec<usize> = BASE.match_indices('>').map(|(i, _)| i + 1).collect();
                let mut at: Vec<(usize, String)> = inserts
                    .into_iter()
                    .map(|(i, e)| (ends[i.index(ends.len())], e))
                    .collect();
                at.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
                let mut s = BASE.to_string();
                for (i, e) in at {
                    s.insert_str(i, &e);
                }
                let mut b = s.into_bytes();
                for (i, byte) in damage {
                    let n = i.index(b.len());
                    b[n] = byte;
                }
                String::from_utf8_lossy(&b).into_owned()
            })
    }

    thread_local! {
        static COUNTS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }

    #[test]
    fn fuzz_domain_definitions() {
        let images = vec![(
            "vda".to_string(),
            PathBuf::from("/data/vms/web/disks/vda.qcow2"),
        )];
        let console = Path::new("/data/vms/web/console.log");
        crate::fuzz::run("domain definitions", definition(), |d| {
            let Ok(spec) = DomainSpec::parse(&d) else {
                COUNTS.with(|c| c.set((c.get().0, c.get().1 + 1)));
                return Ok(());
            };
            COUNTS.with(|c| c.set((c.get().0 + 1, c.get().1)));
            let target = Target {
                name: &spec.name,
                keep_uuid: true,
                domain_type: None,
                images: &images,
                console,
                networks: Networks::Mapped(&[]),
                security_models: &[],
            };
            let out = spec
                .render(&target)
                .map_err(|e| TestCaseError::fail(format!("{e}: {d}")))?;
            let doc = roxmltree::Document::parse(&out)
                .map_err(|e| TestCaseError::fail(format!("renders no XML ({e}): {out}")))?;
            let ours = [
                "/data/vms/web/disks/vda.qcow2",
                "/data/vms/web/console.log",
                "/dev/urandom",
            ];
            for n in doc.descendants().filter(|n| n.is_element()) {
                for a in n.attributes() {
                    if matches!(a.name(), "file" | "path" | "dev" | "socket") {
                        prop_assert!(
                            ours.contains(&a.value())
                                || (a.name() == "dev" && n.has_tag_name("target"))
                                || n.has_tag_name("boot"),
                            "{}={} in {}",
                            a.name(),
                            a.value(),
                            out
                        );
                    }
                }
                match n.tag_name().name() {
                    "interface" => prop_assert_eq!(n.attribute("type"), Some("network")),
                    "listen" => prop_assert_eq!(n.attribute("address"), Some("127.0.0.1")),
                    "disk" => prop_assert_eq!(n.attribute("type"), Some("file")),
                    "hostdev" | "filesystem" | "loader" | "nvram" | "backingStore" | "log"
                    | "script" | "emulator" => {
                        prop_assert!(false, "<{}> in {}", n.tag_name().name(), out)
                    }
                    _ => {}
                }
                prop_assert!(n.tag_name().namespace().is_none(), "{}", out);
            }
            let again = DomainSpec::parse(&out).map_err(|e| {
                TestCaseError::fail(format!("{e}: the rendering reads back: {out}"))
            })?;
            // Disks with no image here are left out of the rendering.
            let mut kept = spec.clone();
            kept.disks
                .retain(|d| images.iter().any(|(n, _)| *n == d.target));
            prop_assert_eq!(&again, &kept);
            Ok(())
        });
        let (accepted, refused) = COUNTS.with(std::cell::Cell::get);
        println!("domain definitions: {accepted} accepted, {refused} refused");
        assert!(
            accepted > 0 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
    }
}
