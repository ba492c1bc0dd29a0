//! The seed's network settings: parsing, validation (errors name the key), rendering into
//! systemd-networkd units, writing them, and `hearth-agent render-network` as a process.

use std::path::Path;
use std::process::Command;

use hearth_agent::netconfig::{
    BondMode, LinkKind, NetConfigError, NetworkSettings, OTHERS_UNIT, parse_cidr, render,
    render_seed, write_units,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const BIN: &str = env!("CARGO_BIN_EXE_hearth-agent");

/// A whole seed: issue 5's keys (ignored here) and a `[network]` table with a bond of two NICs,
/// a VLAN on it, a static NIC matched by MAC and a jumbo MTU.
const SEED: &str = r#"
fleet_url = "https://fleet.example:7443"
fleet_name = "fleet.example"
ca_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
token = "hearth_tok_abc"
https_proxy = "http://proxy.example:3128"

[network]
dhcp_others = false

[[network.links]]
name = "bond0"
kind = "bond"
members = ["enp65s0f0", "enp65s0f1"]
mtu = 9000
dhcp = false

[[network.links]]
name = "bond0.100"
kind = "vlan"
vlan_id = 100
parent = "bond0"
addresses = ["192.0.2.10/24", "2001:db8::10/64"]
gateway = "192.0.2.1"
dns = ["192.0.2.53", "2001:db8::53"]

[[network.links]]
name = "mgmt"
mac = "AA:BB:CC:00:11:22"
addresses = ["198.51.100.7/25"]
"#;

fn parse(text: &str) -> Result<Option<NetworkSettings>, NetConfigError> {
    NetworkSettings::parse_seed(text, Path::new("/seed.toml"))
}

/// The error's message for a seed that must be refused.
fn refused(text: &str) -> String {
    match parse(text) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn parses_a_full_seed_and_ignores_the_fleet_keys() -> TestResult {
    let settings = parse(SEED)?.ok_or("no [network]")?;
    assert!(!settings.dhcp_others);
    assert_eq!(settings.links.len(), 3);
    assert_eq!(settings.links[0].kind, LinkKind::Bond);
    assert_eq!(settings.links[0].bond_mode, None);
    assert_eq!(settings.links[1].kind, LinkKind::Vlan);
    assert_eq!(settings.links[1].vlan_id, Some(100));
    assert_eq!(settings.links[2].kind, LinkKind::Ethernet);
    Ok(())
}

#[test]
fn a_seed_without_network_has_no_settings() -> TestResult {
    assert_eq!(parse("fleet_url = \"https://x\"\ntoken = \"t\"\n")?, None);
    // An empty table is DHCP everywhere, like no table.
    let empty = parse("[network]\n")?.ok_or("no [network]")?;
    assert_eq!(empty, NetworkSettings::default());
    assert!(render(&empty).is_empty());
    Ok(())
}

#[test]
fn renders_bond_vlan_static_and_others_exactly() -> TestResult {
    let settings = parse(SEED)?.ok_or("no [network]")?;
    let units = render(&settings);
    let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "10-hearth-bond0.netdev",
            "10-hearth-bond0-members.network",
            "10-hearth-bond0.network",
            "10-hearth-bond0.100.netdev",
            "10-hearth-bond0.100.network",
            "10-hearth-mgmt.network",
            OTHERS_UNIT,
        ]
    );
    let text = |name: &str| {
        units.iter().find(|u| u.name == name).map(|u| u.text.clone()).unwrap_or_default()
    };
    let body = |name: &str| {
        text(name).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
    };
    assert_eq!(
        body("10-hearth-bond0.netdev"),
        "[NetDev]\nName=bond0\nKind=bond\nMTUBytes=9000\n\n[Bond]\nMode=802.3ad\n\
         MIIMonitorSec=100ms\nLACPTransmitRate=fast\nTransmitHashPolicy=layer3+4"
    );
    assert_eq!(
        body("10-hearth-bond0-members.network"),
        "[Match]\nName=enp65s0f0 enp65s0f1\n\n[Network]\nBond=bond0\n\n[Link]\nMTUBytes=9000"
    );
    assert_eq!(
        body("10-hearth-bond0.network"),
        "[Match]\nName=bond0\n\n[Network]\nDHCP=no\nLinkLocalAddressing=ipv6\nVLAN=bond0.100"
    );
    assert_eq!(
        body("10-hearth-bond0.100.netdev"),
        "[NetDev]\nName=bond0.100\nKind=vlan\n\n[VLAN]\nId=100"
    );
    assert_eq!(
        body("10-hearth-bond0.100.network"),
        "[Match]\nName=bond0.100\n\n[Network]\nDHCP=no\nLinkLocalAddressing=ipv6\n\
         Address=192.0.2.10/24\nAddress=2001:db8::10/64\nGateway=192.0.2.1\n\
         DNS=192.0.2.53\nDNS=2001:db8::53"
    );
    // Matched by MAC (lower-cased), static, so no DHCP.
    assert_eq!(
        body("10-hearth-mgmt.network"),
        "[Match]\nMACAddress=aa:bb:cc:00:11:22\n\n[Network]\nDHCP=no\nLinkLocalAddressing=ipv6\n\
         Address=198.51.100.7/25"
    );
    assert!(body(OTHERS_UNIT).contains("[Match]\nType=ether\nKind=!*\n\n[Network]\nDHCP=no"));
    // Every file says where it came from.
    assert!(units.iter().all(|u| u.text.starts_with("# Rendered by hearth-agent render-network")));
    Ok(())
}

#[test]
fn ethernet_defaults_to_dhcp_and_takes_its_mtu_and_glob() -> TestResult {
    let s = parse("[network]\n[[network.links]]\nname = \"enp*\"\nmtu = 1500\n")?
        .ok_or("no [network]")?;
    let units = render(&s);
    assert_eq!(units.len(), 1, "dhcp_others defaults to true: no others unit");
    assert_eq!(units[0].name, "10-hearth-enp_.network");
    assert!(
        units[0]
            .text
            .contains("[Match]\nName=enp*\n\n[Link]\nMTUBytes=1500\n\n[Network]\nDHCP=yes\n")
    );
    let s = parse(
        "[network]\n[[network.links]]\nname = \"b\"\nkind = \"bond\"\nmembers = [\"eth0\"]\n\
         bond_mode = \"active-backup\"\n",
    )?
    .ok_or("no [network]")?;
    assert_eq!(s.links[0].bond_mode, Some(BondMode::ActiveBackup));
    let netdev = &render(&s)[0].text;
    assert!(netdev.contains("Mode=active-backup\nMIIMonitorSec=100ms\n"));
    assert!(!netdev.contains("LACP"), "LACP settings only for 802.3ad: {netdev}");
    Ok(())
}

#[test]
fn bad_settings_are_refused_naming_the_key() {
    let link = |body: &str| format!("[network]\n[[network.links]]\n{body}\n");
    let cases: &[(String, &str)] = &[
        (
            link("name = \"eth0\"\nspeed = 10"),
            "key `network.links[0].speed`: unknown field `speed`",
        ),
        ("[network]\ndhcp = true\n".into(), "key `network.dhcp`: unknown field `dhcp`"),
        (
            link("name = \"eth0\"\nkind = \"wifi\""),
            "key `network.links[0].kind`: unknown variant `wifi`",
        ),
        (
            link("name = \"this-name-is-too-long\""),
            "key `network.links[0].name`: \"this-name-is-too-long\" must be 1-15 characters",
        ),
        (link("name = \"eth0\\nDNS=1.1.1.1\""), "key `network.links[0].name`"),
        (
            link("name = \"bond*\"\nkind = \"bond\"\nmembers = [\"a\"]"),
            "key `network.links[0].name`: \"bond*\" contains '*'",
        ),
        (
            link("name = \"eth0\"\naddresses = [\"192.0.2.1\"]"),
            "key `network.links[0].addresses[0]`: \"192.0.2.1\" has no prefix length",
        ),
        (
            link("name = \"eth0\"\naddresses = [\"192.0.2.1/33\"]"),
            "key `network.links[0].addresses[0]`: prefix length \"33\" is not 0-32",
        ),
        (
            link("name = \"eth0\"\naddresses = [\"300.0.2.1/24\"]"),
            "key `network.links[0].addresses[0]`: \"300.0.2.1\" is not an IP address",
        ),
        (
            link("name = \"eth0\"\ngateway = \"192.0.2.1\""),
            "key `network.links[0].gateway`: 192.0.2.1 needs a static address of the same family",
        ),
        (
            link("name = \"eth0\"\naddresses = [\"2001:db8::1/64\"]\ngateway = \"192.0.2.1\""),
            "key `network.links[0].gateway`",
        ),
        (link("name = \"eth0\"\nmtu = 100"), "key `network.links[0].mtu`: 100 is not 576-9216"),
        (
            link("name = \"eth0\"\nmac = \"aa:bb\""),
            "key `network.links[0].mac`: \"aa:bb\" is not a MAC address",
        ),
        (
            link("name = \"b0\"\nkind = \"bond\""),
            "key `network.links[0].members`: a bond needs 1-16 member NICs",
        ),
        (
            link("name = \"eth0\"\nmembers = [\"eth1\"]"),
            "key `network.links[0].members`: only a bond link has members",
        ),
        (
            link("name = \"v\"\nkind = \"vlan\"\nparent = \"eth0\""),
            "key `network.links[0].vlan_id`: a vlan needs vlan_id",
        ),
        (
            link("name = \"v\"\nkind = \"vlan\"\nvlan_id = 4095\nparent = \"eth0\""),
            "key `network.links[0].vlan_id`: 4095 is not 1-4094",
        ),
        (
            link("name = \"v\"\nkind = \"vlan\"\nvlan_id = 7\nparent = \"eth0\""),
            "key `network.links[0].parent`: \"eth0\" is not a link of network.links",
        ),
        (
            link("name = \"v\"\nkind = \"vlan\"\nvlan_id = 7"),
            "key `network.links[0].parent`: a vlan needs parent",
        ),
        (
            link("name = \"eth0\"\n[[network.links]]\nname = \"eth0\""),
            "key `network.links[1].name`: \"eth0\" is named twice",
        ),
        (
            link(
                "name = \"eth0\"\n[[network.links]]\nname = \"b0\"\nkind = \"bond\"\nmembers = [\"eth0\"]",
            ),
            "key `network.links[1].members[0]`: \"eth0\" is also a link of its own",
        ),
        (
            link(
                "name = \"b0\"\nkind = \"bond\"\nmembers = [\"e1\"]\n[[network.links]]\nname = \"b1\"\nkind = \"bond\"\nmembers = [\"e1\"]",
            ),
            "key `network.links[1].members[0]`: \"e1\" is a member of two bonds",
        ),
        (
            link(
                "name = \"e\"\n[[network.links]]\nname = \"v1\"\nkind = \"vlan\"\nvlan_id = 1\nparent = \"e\"\n[[network.links]]\nname = \"v2\"\nkind = \"vlan\"\nvlan_id = 2\nparent = \"v1\"",
            ),
            "key `network.links[2].parent`: \"v1\" is itself a vlan",
        ),
        ("[network\n".into(), "seed /seed.toml: key `.`"),
    ];
    for (text, want) in cases {
        let got = refused(text);
        assert!(got.starts_with("seed /seed.toml: key `"), "{got}");
        assert!(got.contains(want), "seed:\n{text}\nwant: {want}\ngot:  {got}");
    }
}

#[test]
fn cidr_parsing() {
    assert_eq!(parse_cidr("10.0.2.20/24").map(|c| c.to_string()), Ok("10.0.2.20/24".into()));
    assert_eq!(parse_cidr("2001:DB8::1/64").map(|c| c.to_string()), Ok("2001:db8::1/64".into()));
    assert!(parse_cidr("0.0.0.0/0").is_err());
    assert!(parse_cidr("224.0.0.1/4").is_err());
    assert!(parse_cidr("10.0.0.1/").is_err());
    assert!(parse_cidr("::1/129").is_err());
}

#[test]
fn write_units_replaces_its_own_files_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("network");
    std::fs::create_dir(&out)?;
    std::fs::write(out.join("10-hearth-old.network"), "stale")?;
    std::fs::write(out.join("50-operator.network"), "theirs")?;
    let settings = parse(SEED)?.ok_or("no [network]")?;
    let units = render(&settings);
    write_units(&out, &units)?;
    assert!(!out.join("10-hearth-old.network").exists(), "a unit of an earlier run is removed");
    assert_eq!(std::fs::read_to_string(out.join("50-operator.network"))?, "theirs");
    for unit in &units {
        let path = out.join(&unit.name);
        assert_eq!(std::fs::read_to_string(&path)?, unit.text);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o644);
    }
    // A seed without [network] removes what the last run wrote.
    let seed = dir.path().join("seed.toml");
    std::fs::write(&seed, "token = \"t\"\n")?;
    assert_eq!(render_seed(&seed, &out)?, 0);
    let left: Vec<String> = std::fs::read_dir(&out)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(left, ["50-operator.network"]);
    Ok(())
}

#[test]
fn render_network_command_writes_units_and_refuses_a_bad_seed_changing_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run-network");
    let seed = dir.path().join("seed.toml");
    std::fs::write(&seed, SEED)?;
    let run = || {
        Command::new(BIN)
            .args(["render-network", "--seed"])
            .arg(&seed)
            .arg("--out")
            .arg(&out)
            .output()
    };
    let ok = run()?;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("7 network units"));
    let before: Vec<_> =
        std::fs::read_dir(&out)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    assert_eq!(before.len(), 7);

    std::fs::write(&seed, SEED.replace("vlan_id = 100", "vlan_id = 0"))?;
    let bad = run()?;
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("key `network.links[1].vlan_id`: 0 is not 1-4094"), "{stderr}");
    let after: Vec<_> =
        std::fs::read_dir(&out)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    assert_eq!(before.len(), after.len(), "a bad seed changes nothing");

    std::fs::remove_file(&seed)?;
    let missing = run()?;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read seed"));
    Ok(())
}
