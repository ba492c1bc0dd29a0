//! A node's network settings from its seed, rendered into systemd-networkd units.
//!
//! The seed (one small TOML file; see `docs/flashing.md`) may carry a `[network]` table:
//! static addresses, bonds, VLANs and MTUs for the NICs that must not use DHCP. This module owns
//! that table: [`NetworkSettings`] (typed, `deny_unknown_fields`, validated with errors that name
//! the key) and [`render`], which turns it into `.network`/`.netdev` files. The image runs
//! `hearth-agent render-network --seed FILE --out /run/systemd/network` before networkd starts
//! (`hearth-seed.service`); every NIC the settings do not name keeps the image's default, DHCP.
//! The seed's other keys (fleet, token, proxy) belong to the seed parser and are ignored here.
//! Design: `docs/0008-image.md`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of every file [`render`] writes: it sorts before the image's default
/// (`89-hearth-dhcp.network`), so a NIC named here is configured by the seed, and lets
/// [`write_units`] replace exactly the files of an earlier run.
pub const UNIT_PREFIX: &str = "10-hearth-";

/// Name of the file that turns DHCP off on the NICs the settings do not name
/// (`dhcp_others = false`); sorts after the seed's own files and before the image's default.
pub const OTHERS_UNIT: &str = "80-hearth-others.network";

/// Most links one seed may describe.
pub const MAX_LINKS: usize = 64;

/// Most addresses, DNS servers or bond members on one link.
pub const MAX_PER_LINK: usize = 16;

/// The `[network]` table of a seed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// DHCP (v4 and v6) on every Ethernet NIC that no link below names (including bond members
    /// and VLAN parents, which are named). Default `true`; `false` leaves such NICs unconfigured.
    #[serde(default = "yes")]
    pub dhcp_others: bool,
    /// NICs to configure, bonds and VLANs to create (`[[network.links]]`), at most 64.
    #[serde(default)]
    pub links: Vec<Link>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self { dhcp_others: true, links: Vec::new() }
    }
}

fn yes() -> bool {
    true
}

/// What a link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// A physical NIC, matched by `name` (may be a glob such as `enp*`) or by `mac`.
    #[default]
    Ethernet,
    /// A bond of the NICs in `members`, created under `name`.
    Bond,
    /// A VLAN `vlan_id` on the link named `parent`, created under `name`.
    Vlan,
}

/// How a bond spreads traffic (systemd.netdev `[Bond] Mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum BondMode {
    /// LACP (`802.3ad`), the default: needs a switch configured for it.
    #[default]
    #[serde(rename = "802.3ad")]
    Lacp,
    /// One member carries traffic, another takes over when it fails.
    #[serde(rename = "active-backup")]
    ActiveBackup,
    /// Round robin.
    #[serde(rename = "balance-rr")]
    BalanceRr,
    /// Transmit hash.
    #[serde(rename = "balance-xor")]
    BalanceXor,
    /// Adaptive transmit load balancing.
    #[serde(rename = "balance-tlb")]
    BalanceTlb,
    /// Adaptive load balancing.
    #[serde(rename = "balance-alb")]
    BalanceAlb,
}

impl BondMode {
    fn networkd(self) -> &'static str {
        match self {
            Self::Lacp => "802.3ad",
            Self::ActiveBackup => "active-backup",
            Self::BalanceRr => "balance-rr",
            Self::BalanceXor => "balance-xor",
            Self::BalanceTlb => "balance-tlb",
            Self::BalanceAlb => "balance-alb",
        }
    }
}

/// One NIC, bond or VLAN (`[[network.links]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Interface name: the NIC to match (a glob like `enp*` is allowed for `ethernet`), or the
    /// bond or VLAN to create (1-15 characters: letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// `ethernet` (default), `bond` or `vlan`.
    #[serde(default)]
    pub kind: LinkKind,
    /// `ethernet` only: match the NIC by MAC address (`aa:bb:cc:dd:ee:ff`) instead of by name.
    pub mac: Option<String>,
    /// `bond` only: the member NICs' names (globs allowed), 1-16 of them.
    #[serde(default)]
    pub members: Vec<String>,
    /// `bond` only: `802.3ad` (default), `active-backup`, `balance-rr`, `balance-xor`,
    /// `balance-tlb` or `balance-alb`.
    pub bond_mode: Option<BondMode>,
    /// `vlan` only: the VLAN id, 1-4094.
    pub vlan_id: Option<u16>,
    /// `vlan` only: the link that carries the VLAN; must be another link of this table.
    pub parent: Option<String>,
    /// DHCP (v4 and v6) on this link. Default: on when `addresses` is empty, off otherwise.
    pub dhcp: Option<bool>,
    /// Static addresses with prefix length (`192.0.2.10/24`, `2001:db8::10/64`), at most 16.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Default gateway; needs a static address of the same family.
    pub gateway: Option<IpAddr>,
    /// DNS servers, at most 16.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// MTU in bytes, 576-9216 (jumbo frames: 9000). Bond members take the bond's MTU.
    pub mtu: Option<u32>,
}

/// Settings that cannot be used; each names the seed file and the key.
#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    /// The seed cannot be read.
    #[error("cannot read seed {path}")]
    Read {
        /// The seed file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown or a value has the wrong type.
    #[error("seed {path}: key `{key}`: {message}")]
    Parse {
        /// The seed file.
        path: PathBuf,
        /// Dotted key path (`.` for the document).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("seed {path}: key `{key}`: {message}")]
    Invalid {
        /// The seed file.
        path: PathBuf,
        /// Dotted key path, e.g. `network.links[1].vlan_id`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A rendered unit cannot be written, or an old one removed.
    #[error("cannot write network units in {dir}")]
    Write {
        /// The output directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: crate::persist::PersistError,
    },
}

/// Only the seed's `[network]` table; every other key of the seed is left to the seed parser.
#[derive(Debug, Deserialize)]
struct SeedNetwork {
    #[serde(default)]
    network: Option<NetworkSettings>,
}

/// A static address: IP and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub ip: IpAddr,
    /// Prefix length (0-32 for IPv4, 0-128 for IPv6).
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// Parse `ADDRESS/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (ip, prefix) =
        s.split_once('/').ok_or_else(|| format!("{s:?} has no prefix length (e.g. /24)"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("prefix length {prefix:?} is not 0-{max}"))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{ip} cannot be a host address"));
    }
    Ok(Cidr { ip, prefix })
}

fn valid_ifname(name: &str, glob: bool) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1-15 characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not an interface name"));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if let Some(bad) = name.chars().find(|&c| !(ok(c) || (glob && matches!(c, '*' | '?')))) {
        return Err(format!(
            "{name:?} contains {bad:?}; use letters, digits, '-', '_', '.'{}",
            if glob { " and the globs '*', '?'" } else { "" }
        ));
    }
    Ok(())
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl NetworkSettings {
    /// Read the `[network]` table of the seed at `path`: `None` when the seed has none.
    pub fn load_seed(path: &Path) -> Result<Option<Self>, NetConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| NetConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse_seed(&text, path)
    }

    /// Parse and validate a seed's text; `path` names it in errors.
    pub fn parse_seed(text: &str, path: &Path) -> Result<Option<Self>, NetConfigError> {
        let parse_err = |key: String, message: String| NetConfigError::Parse {
            path: path.to_path_buf(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| parse_err(".".into(), e.message().to_string()))?;
        let seed: SeedNetwork = serde_path_to_error::deserialize(de)
            .map_err(|e| parse_err(e.path().to_string(), e.inner().message().to_string()))?;
        if let Some(settings) = &seed.network {
            settings.validate(path)?;
        }
        Ok(seed.network)
    }

    /// Check every value and the links' references to each other.
    pub fn validate(&self, path: &Path) -> Result<(), NetConfigError> {
        let invalid = |key: String, message: String| NetConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if self.links.len() > MAX_LINKS {
            return Err(invalid(
                "network.links".into(),
                format!("{} links; at most {MAX_LINKS}", self.links.len()),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let key = |field: &str| format!("network.links[{i}].{field}");
            let glob = link.kind == LinkKind::Ethernet;
            valid_ifname(&link.name, glob).map_err(|m| invalid(key("name"), m))?;
            if !names.insert(link.name.as_str()) {
                return Err(invalid(key("name"), format!("{:?} is named twice", link.name)));
            }
            if let Some(mac) = &link.mac {
                if link.kind != LinkKind::Ethernet {
                    return Err(invalid(
                        key("mac"),
                        "only an ethernet link is matched by MAC".into(),
                    ));
                }
                if !valid_mac(mac) {
                    return Err(invalid(
                        key("mac"),
                        format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                    ));
                }
            }
            let only = |field: &str, present: bool, kind: &str| {
                if present {
                    Err(invalid(key(field), format!("only a {kind} link has {field}")))
                } else {
                    Ok(())
                }
            };
            only("members", !link.members.is_empty() && link.kind != LinkKind::Bond, "bond")?;
            only("bond_mode", link.bond_mode.is_some() && link.kind != LinkKind::Bond, "bond")?;
            only("vlan_id", link.vlan_id.is_some() && link.kind != LinkKind::Vlan, "vlan")?;
            only("parent", link.parent.is_some() && link.kind != LinkKind::Vlan, "vlan")?;
            match link.kind {
                LinkKind::Ethernet => {}
                LinkKind::Bond => {
                    if link.members.is_empty() || link.members.len() > MAX_PER_LINK {
                        return Err(invalid(
                            key("members"),
                            format!("a bond needs 1-{MAX_PER_LINK} member NICs"),
                        ));
                    }
                    for (j, member) in link.members.iter().enumerate() {
                        valid_ifname(member, true)
                            .map_err(|m| invalid(format!("{}[{j}]", key("members")), m))?;
                    }
                }
                LinkKind::Vlan => {
                    match link.vlan_id {
                        Some(1..=4094) => {}
                        Some(id) => {
                            return Err(invalid(key("vlan_id"), format!("{id} is not 1-4094")));
                        }
                        None => return Err(invalid(key("vlan_id"), "a vlan needs vlan_id".into())),
                    }
                    if link.parent.is_none() {
                        return Err(invalid(key("parent"), "a vlan needs parent".into()));
                    }
                }
            }
            if link.addresses.len() > MAX_PER_LINK {
                return Err(invalid(key("addresses"), format!("at most {MAX_PER_LINK}")));
            }
            let mut cidrs = Vec::new();
            for (j, a) in link.addresses.iter().enumerate() {
                cidrs.push(
                    parse_cidr(a).map_err(|m| invalid(format!("{}[{j}]", key("addresses")), m))?,
                );
            }
            if let Some(gw) = link.gateway {
                if !cidrs.iter().any(|c| c.ip.is_ipv4() == gw.is_ipv4()) {
                    return Err(invalid(
                        key("gateway"),
                        format!("{gw} needs a static address of the same family in addresses"),
                    ));
                }
                if gw.is_unspecified() || gw.is_multicast() {
                    return Err(invalid(key("gateway"), format!("{gw} cannot be a gateway")));
                }
            }
            if link.dns.len() > MAX_PER_LINK {
                return Err(invalid(key("dns"), format!("at most {MAX_PER_LINK}")));
            }
            if let Some(mtu) = link.mtu
                && !(576..=9216).contains(&mtu)
            {
                return Err(invalid(key("mtu"), format!("{mtu} is not 576-9216")));
            }
        }
        // References between links, once every name is known.
        let mut members = BTreeSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let key = |field: &str| format!("network.links[{i}].{field}");
            if let Some(parent) = &link.parent {
                match self.links.iter().find(|l| &l.name == parent) {
                    None => {
                        return Err(invalid(
                            key("parent"),
                            format!("{parent:?} is not a link of network.links"),
                        ));
                    }
                    Some(p) if p.kind == LinkKind::Vlan => {
                        return Err(invalid(key("parent"), format!("{parent:?} is itself a vlan")));
                    }
                    Some(_) => {}
                }
            }
            for (j, member) in link.members.iter().enumerate() {
                if !members.insert(member.as_str()) {
                    return Err(invalid(
                        format!("{}[{j}]", key("members")),
                        format!("{member:?} is a member of two bonds"),
                    ));
                }
                if self.links.iter().any(|l| &l.name == member) {
                    return Err(invalid(
                        format!("{}[{j}]", key("members")),
                        format!(
                            "{member:?} is also a link of its own; a bond member is configured by its bond"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One rendered unit file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// File name (no directory), `10-hearth-*.network`/`.netdev` or [`OTHERS_UNIT`].
    pub name: String,
    /// Contents.
    pub text: String,
}

/// Render validated settings into networkd units. Pure: the same settings give the same files.
pub fn render(settings: &NetworkSettings) -> Vec<Unit> {
    let mut units = Vec::new();
    let header = "# Rendered by hearth-agent render-network from the node's seed; do not edit.\n";
    for link in &settings.links {
        let base = format!("{UNIT_PREFIX}{}", link.name.replace(['*', '?'], "_"));
        // The netdev that creates a bond or VLAN.
        match link.kind {
            LinkKind::Ethernet => {}
            LinkKind::Bond => {
                let mode = link.bond_mode.unwrap_or_default();
                let mut t = format!("{header}[NetDev]\nName={}\nKind=bond\n", link.name);
                if let Some(mtu) = link.mtu {
                    let _ = writeln!(t, "MTUBytes={mtu}");
                }
                let _ = write!(t, "\n[Bond]\nMode={}\nMIIMonitorSec=100ms\n", mode.networkd());
                if mode == BondMode::Lacp {
                    t.push_str("LACPTransmitRate=fast\nTransmitHashPolicy=layer3+4\n");
                }
                units.push(Unit { name: format!("{base}.netdev"), text: t });
                let mut m = format!(
                    "{header}[Match]\nName={}\n\n[Network]\nBond={}\n",
                    link.members.join(" "),
                    link.name
                );
                if let Some(mtu) = link.mtu {
                    let _ = write!(m, "\n[Link]\nMTUBytes={mtu}\n");
                }
                units.push(Unit { name: format!("{base}-members.network"), text: m });
            }
            LinkKind::Vlan => {
                let mut t = format!("{header}[NetDev]\nName={}\nKind=vlan\n", link.name);
                if let Some(mtu) = link.mtu {
                    let _ = writeln!(t, "MTUBytes={mtu}");
                }
                let _ = write!(t, "\n[VLAN]\nId={}\n", link.vlan_id.unwrap_or_default());
                units.push(Unit { name: format!("{base}.netdev"), text: t });
            }
        }
        // The link's own addressing.
        let mut t = header.to_string();
        t.push_str("[Match]\n");
        match (&link.kind, &link.mac) {
            (LinkKind::Ethernet, Some(mac)) => {
                let _ = writeln!(t, "MACAddress={}", mac.to_ascii_lowercase());
            }
            _ => {
                let _ = writeln!(t, "Name={}", link.name);
            }
        }
        if let (LinkKind::Ethernet, Some(mtu)) = (link.kind, link.mtu) {
            let _ = write!(t, "\n[Link]\nMTUBytes={mtu}\n");
        }
        let dhcp = link.dhcp.unwrap_or(link.addresses.is_empty());
        let _ = write!(t, "\n[Network]\nDHCP={}\n", if dhcp { "yes" } else { "no" });
        if !dhcp {
            t.push_str("LinkLocalAddressing=ipv6\n");
        }
        for a in &link.addresses {
            if let Ok(c) = parse_cidr(a) {
                let _ = writeln!(t, "Address={c}");
            }
        }
        if let Some(gw) = link.gateway {
            let _ = writeln!(t, "Gateway={gw}");
        }
        for d in &link.dns {
            let _ = writeln!(t, "DNS={d}");
        }
        for vlan in settings.links.iter().filter(|l| l.parent.as_deref() == Some(&link.name)) {
            let _ = writeln!(t, "VLAN={}", vlan.name);
        }
        units.push(Unit { name: format!("{base}.network"), text: t });
    }
    if !settings.dhcp_others {
        units.push(Unit {
            name: OTHERS_UNIT.into(),
            text: format!(
                "{header}# dhcp_others = false: NICs the seed does not name stay unconfigured.\n\
                 [Match]\nType=ether\nKind=!*\n\n[Network]\nDHCP=no\nLinkLocalAddressing=no\n"
            ),
        });
    }
    units
}

/// Is `name` a file an earlier [`write_units`] may have written?
fn ours(name: &str) -> bool {
    (name.starts_with(UNIT_PREFIX) && (name.ends_with(".network") || name.ends_with(".netdev")))
        || name == OTHERS_UNIT
}

/// Replace the rendered units in `dir` (created if missing): each written atomically, then the
/// files of an earlier run that are not rendered now removed. Other files are left alone.
pub fn write_units(dir: &Path, units: &[Unit]) -> Result<(), NetConfigError> {
    let werr = |source| NetConfigError::Write { dir: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(|source| {
        werr(crate::persist::PersistError::Io { op: "create", path: dir.to_path_buf(), source })
    })?;
    for unit in units {
        crate::persist::write_atomic(&dir.join(&unit.name), unit.text.as_bytes()).map_err(werr)?;
        // networkd reads its units as an unprivileged user.
        set_mode(&dir.join(&unit.name), 0o644).map_err(werr)?;
    }
    let keep: BTreeSet<&str> = units.iter().map(|u| u.name.as_str()).collect();
    let entries = std::fs::read_dir(dir).map_err(|source| {
        werr(crate::persist::PersistError::Io { op: "list", path: dir.to_path_buf(), source })
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ours(&name) && !keep.contains(name.as_str()) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| {
                werr(crate::persist::PersistError::Io { op: "remove", path, source })
            })?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), crate::persist::PersistError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        crate::persist::PersistError::Io { op: "chmod", path: path.to_path_buf(), source }
    })
}

/// `hearth-agent render-network`: read the seed, validate its `[network]` table, write the units.
/// Returns how many units were written (0 without a `[network]` table, which also removes the
/// units of an earlier run). A bad seed changes nothing in `out`.
pub fn render_seed(seed: &Path, out: &Path) -> Result<usize, NetConfigError> {
    let settings = NetworkSettings::load_seed(seed)?.unwrap_or_default();
    let units = render(&settings);
    write_units(out, &units)?;
    Ok(units.len())
}
