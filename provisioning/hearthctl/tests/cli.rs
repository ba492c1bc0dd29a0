//! `hearthctl` as operators run it, against a real fleet: tokens create prints a ready seed,
//! listing works as a table and JSON, and errors name the cause and exit non-zero.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn ctl(
    config: PathBuf,
    args: &[&str],
) -> Result<Output, Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    Ok(tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hearthctl"))
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
    })
    .await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearthctl_against_a_fleet() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fallback = vec!["https://fleet-b.example:7443".to_string(), "https://10.0.0.9".to_string()];
    let fleet = hearth_fleet::server::start(FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.path().join("fleet"),
        fallback_urls: fallback.clone(),
        ..FleetConfig::default()
    })
    .await?;
    let config = FleetConfig {
        public_url: Some(format!("https://{}", fleet.addr)),
        ..fleet.fleet.config.clone()
    };
    let write_ctl =
        |role, name: &str| -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
            let out = dir.path().join(name);
            std::fs::create_dir_all(&out)?;
            let (c, k) = fleet.fleet.ca.operator_cert(name, role, Duration::from_secs(600))?;
            std::fs::write(out.join("operator.crt"), c.cert_pem)?;
            std::fs::write(out.join("operator.key"), k)?;
            let path = out.join("hearthctl.toml");
            std::fs::write(
                &path,
                hearth_fleet::cli::hearthctl_config(&config, &fleet.fleet.ca.pin(), &out),
            )?;
            Ok(path)
        };
    let admin = write_ctl(Role::Admin, "admin")?;
    let viewer = write_ctl(Role::Viewer, "viewer")?;

    let out =
        ctl(admin.clone(), &["tokens", "create", "--label", "site=ams1", "--channel", "canary"])
            .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seed_text = String::from_utf8(out.stdout)?;
    let seed = hearth_fleet_client::seed::Seed::parse(&seed_text, "hearthctl output")?;
    assert_eq!(seed.fleet.ca_sha256, fleet.fleet.ca.pin());
    // The fleet's other gateways follow its own URL, in order: the node's failover list.
    assert_eq!(seed.fleet.fallback_urls, fallback);
    let endpoints = seed.endpoints()?;
    assert_eq!(endpoints.len(), 3);

    let out = ctl(viewer.clone(), &["tokens", "list", "--json"]).await?;
    assert!(out.status.success());
    let tokens: Vec<hearth_proto::fleet::TokenView> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].labels.get("site").map(String::as_str), Some("ams1"));
    assert_eq!(tokens[0].channel, "canary");
    let out = ctl(viewer.clone(), &["tokens", "list"]).await?;
    let table = String::from_utf8(out.stdout)?;
    assert!(table.starts_with("TOKEN") && table.contains(" CHANNEL "), "{table}");
    assert!(table.contains(" canary "), "{table}");

    let out = ctl(viewer.clone(), &["nodes", "list"]).await?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.starts_with("NODE"));

    for (cfg, args, cause) in [
        (viewer.clone(), vec!["tokens", "create"], "needs admin"),
        (admin.clone(), vec!["nodes", "show", "n-nope"], "no node n-nope"),
        (admin.clone(), vec!["drain", "n-nope"], "n-nope is unknown"),
        (admin.clone(), vec!["channel", "n-nope", "beta"], "n-nope is unknown"),
        (admin.clone(), vec!["channel", "n-nope", "Beta"], "\"Beta\" is not 1 to 32 of a-z"),
        (viewer.clone(), vec!["channel", "n-nope", "beta"], "needs admin"),
        (admin.clone(), vec!["tokens", "create", "--channel", "A"], "\"A\" is not 1 to 32 of a-z"),
        (admin.clone(), vec!["tokens", "revoke", "t-nope"], "no token t-nope"),
        (dir.path().join("missing.toml"), vec!["nodes", "list"], "cannot read"),
    ] {
        let out = ctl(cfg, &args).await?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(cause), "{args:?}: {err:?} lacks {cause:?}");
    }
    fleet.stop().await;
    Ok(())
}
