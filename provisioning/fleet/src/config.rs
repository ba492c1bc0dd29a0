//! `hearth-fleet`'s configuration (TOML, every key optional), validated at load with an error that
//! names the key. The defaults run a fleet on loopback with SQLite in `state_dir`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML of this shape.
    #[error("{path}: {key}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of range.
    #[error("{path}: {key}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// Most entries in `fallback_urls`.
const MAX_FALLBACK_URLS: usize = 16;

/// The fleet's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Address of the one TLS listener (HTTPS `/v1` and `hearth/1` sessions). Default
    /// `127.0.0.1:7443`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The fleet's name: the DNS name in its server certificate, which nodes check (given in seeds).
    /// Default `hearth-fleet`.
    #[serde(default = "default_name")]
    pub name: String,
    /// The URL nodes connect to, printed into seeds (may be an IP address, e.g.
    /// `https://10.0.2.2:7443` for QEMU guests). Default `https://` + `listen`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// More gateways of this fleet (same `name` and CA, one registry: `gateway_id`) as
    /// `https://HOST[:PORT]`, written into seeds after `public_url`: a node fails over to them in
    /// order (`docs/0006-tunnel.md`). At most 16. Default none.
    #[serde(default)]
    pub fallback_urls: Vec<String>,
    /// Directory of the CA, its key (0600) and the SQLite registry. Default `/var/lib/hearth-fleet`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The registry: `sqlite:PATH` or `postgres://…`. Default `sqlite:` + `state_dir/registry.db`.
    #[serde(default)]
    pub registry: Option<String>,
    /// Validity of node certificates in days (1..=90); nodes renew at half-life. Default 7.
    #[serde(default = "default_cert_days")]
    pub cert_validity_days: u32,
    /// Largest accepted request body in bytes (1024..=1048576). Default 65536.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Milliseconds between two batched writes of node liveness to the registry (100..=30000).
    /// Default 5000.
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
    /// This process's name when the fleet runs as several gateway processes on one registry
    /// (letters, digits, `-`, `_`; at most 64): the registry records which gateway holds each
    /// node's session, and changes made through another process reach the node through it.
    /// Unset (the default): a single fleet process.
    #[serde(default)]
    pub gateway_id: Option<String>,
    /// Open the listener with `SO_REUSEPORT`, so several gateway processes share one address
    /// and the kernel spreads connections over them. Default false.
    #[serde(default)]
    pub reuse_port: bool,
    /// Address the listeners of `hearthctl expose` bind (customer ingress to node ports).
    /// Default `127.0.0.1`; `0.0.0.0` takes customers on every interface.
    #[serde(default = "default_expose_bind")]
    pub expose_bind: std::net::IpAddr,
    /// The gateway ports `hearthctl expose` hands out, `[FIRST, LAST]` (1..=65535, FIRST <=
    /// LAST); the lowest free one is taken. Default `[20000, 20999]`.
    #[serde(default = "default_expose_ports")]
    pub expose_ports: [u16; 2],
    /// Carry each node's control session on its tunnel (ALPN `hearth-tunnel/2`): one connection
    /// per node, whose pings and reconnection the session shares. False: nodes keep a separate
    /// `hearth/1` session, as with fleets before it. Default true.
    #[serde(default = "default_true")]
    pub tunnel_sessions: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}
fn default_name() -> String {
    "hearth-fleet".into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hearth-fleet")
}
fn default_cert_days() -> u32 {
    7
}
fn default_max_body() -> usize {
    65536
}
fn default_flush_ms() -> u64 {
    5000
}
fn default_expose_bind() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1])
}
fn default_expose_ports() -> [u16; 2] {
    [20000, 20999]
}
fn default_true() -> bool {
    true
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            name: default_name(),
            public_url: None,
            fallback_urls: Vec::new(),
            state_dir: default_state_dir(),
            registry: None,
            cert_validity_days: default_cert_days(),
            max_body_bytes: default_max_body(),
            flush_interval_ms: default_flush_ms(),
            gateway_id: None,
            reuse_port: false,
            expose_bind: default_expose_bind(),
            expose_ports: default_expose_ports(),
            tunnel_sessions: true,
        }
    }
}

impl FleetConfig {
    /// Load and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parse and validate text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            key: String::new(),
            message: e.message().to_string(),
        })?;
        let config: Self =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                key: e.path().to_string(),
                message: e.inner().message().to_string(),
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Check ranges.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key, problem: String| ConfigError::Invalid { path: path.to_path_buf(), key, problem };
        if !(1..=90).contains(&self.cert_validity_days) {
            return Err(invalid(
                "cert_validity_days",
                format!("{} is not in 1..=90", self.cert_validity_days),
            ));
        }
        if !(1024..=1_048_576).contains(&self.max_body_bytes) {
            return Err(invalid(
                "max_body_bytes",
                format!("{} is not in 1024..=1048576", self.max_body_bytes),
            ));
        }
        if !(100..=30_000).contains(&self.flush_interval_ms) {
            return Err(invalid(
                "flush_interval_ms",
                format!("{} is not in 100..=30000", self.flush_interval_ms),
            ));
        }
        if let Some(g) = &self.gateway_id
            && (g.is_empty()
                || g.len() > 64
                || !g.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(invalid(
                "gateway_id",
                format!("{g:?} is not 1-64 letters, digits, '-' or '_'"),
            ));
        }
        if let [first, last] = self.expose_ports
            && (first == 0 || first > last)
        {
            return Err(invalid(
                "expose_ports",
                format!("[{first}, {last}] is not [FIRST, LAST] with 1 <= FIRST <= LAST"),
            ));
        }
        if hearth_fleet_client::tls::server_name(&self.name).is_err() {
            return Err(invalid("name", format!("{:?} is not a DNS name", self.name)));
        }
        if let Some(url) = &self.public_url {
            hearth_fleet_client::https::Endpoint::from_url(url, &self.name).map_err(|_| {
                invalid("public_url", format!("{url:?} is not https://HOST[:PORT]"))
            })?;
        }
        if self.fallback_urls.len() > MAX_FALLBACK_URLS {
            return Err(invalid(
                "fallback_urls",
                format!("{} entries; at most {MAX_FALLBACK_URLS}", self.fallback_urls.len()),
            ));
        }
        for url in &self.fallback_urls {
            hearth_fleet_client::https::Endpoint::from_url(url, &self.name).map_err(|_| {
                invalid("fallback_urls", format!("{url:?} is not https://HOST[:PORT]"))
            })?;
        }
        Ok(())
    }

    /// The URL put in seeds.
    pub fn public_url(&self) -> String {
        self.public_url.clone().unwrap_or_else(|| format!("https://{}", self.listen))
    }

    /// The registry URL.
    pub fn registry_url(&self) -> String {
        self.registry
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.state_dir.join("registry.db").display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let p = Path::new("fleet.toml");
        let e = FleetConfig::parse("cert_validity_days = 365", p).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("fleet.toml: cert_validity_days: 365 is not in 1..=90"));
        let e = FleetConfig::parse("listen = 7", p).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.starts_with("fleet.toml: listen:")), "{e:?}");
        let e = FleetConfig::parse("colour = 1", p).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("colour")), "{e:?}");
        assert_eq!(FleetConfig::parse("", p).ok(), Some(FleetConfig::default()));
        let e = FleetConfig::parse("gateway_id = \"g 1\"", p).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("fleet.toml: gateway_id: \"g 1\" is not 1-64 letters, digits, '-' or '_'")
        );
        let c = FleetConfig::parse("gateway_id = \"g-1\"\nreuse_port = true", p).ok();
        assert_eq!(c.as_ref().and_then(|c| c.gateway_id.as_deref()), Some("g-1"));
        assert!(c.is_some_and(|c| c.reuse_port));
        let e = FleetConfig::parse("expose_ports = [3000, 2000]", p).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "fleet.toml: expose_ports: [3000, 2000] is not [FIRST, LAST] with 1 <= FIRST <= LAST"
            )
        );
        let e = FleetConfig::parse("fallback_urls = [\"https://b:7443\", \"http://c\"]", p)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("fleet.toml: fallback_urls: \"http://c\" is not https://HOST[:PORT]")
        );
        let many = vec!["\"https://b:7443\""; 17].join(", ");
        let e = FleetConfig::parse(&format!("fallback_urls = [{many}]"), p).err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("fleet.toml: fallback_urls: 17 entries; at most 16")
        );
        let c = FleetConfig::parse("fallback_urls = [\"https://b:7443\"]", p).ok();
        assert_eq!(c.map(|c| c.fallback_urls), Some(vec!["https://b:7443".to_string()]));
        let c =
            FleetConfig::parse("expose_bind = \"0.0.0.0\"\nexpose_ports = [9000, 9001]", p).ok();
        assert_eq!(
            c.map(|c| (c.expose_bind.to_string(), c.expose_ports)),
            Some(("0.0.0.0".into(), [9000, 9001]))
        );
    }
}
