//! The seed: one small TOML file that tells a freshly flashed node which fleet to join.
//!
//! ```toml
//! [fleet]
//! url = "https://10.0.2.2:7443"   # where to connect
//! name = "hearth-fleet"            # the name the fleet's certificate carries
//! ca_sha256 = "…64 hex digits…"    # SHA-256 of the fleet CA (DER): the only CA trusted
//! token = "…"                      # enrollment token
//! https_proxy = "http://proxy:3128" # optional
//!
//! [network]                        # optional: static addressing, bonds, VLANs, MTU
//! ```

use serde::{Deserialize, Serialize};

/// Why a seed is not valid.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Not TOML of the seed's shape.
    #[error("seed from {origin} is invalid")]
    Parse {
        /// Where it came from.
        origin: String,
        /// Why (names the key).
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A field has a bad value.
    #[error("seed from {origin}: {key}: {problem}")]
    Invalid {
        /// Where it came from.
        origin: String,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The seed file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// `[fleet]`: which fleet to join.
    pub fleet: SeedFleet,
    /// `[network]`: static network settings (rendered by the OS image into networkd units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<toml::Table>,
}

/// `[fleet]` of the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedFleet {
    /// Fleet URL, `https://HOST[:PORT]`; HOST may be an IP address.
    pub url: String,
    /// The DNS name in the fleet's certificate (checked instead of HOST).
    pub name: String,
    /// SHA-256 (hex) of the fleet CA certificate's DER: the only CA the node trusts.
    pub ca_sha256: String,
    /// The enrollment token.
    pub token: String,
    /// HTTPS proxy (`http://HOST:PORT`) to reach the fleet through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    /// More gateway URLs of the same fleet (same name and CA), tried in order after `url` when
    /// the one in use fails (`docs/0006-tunnel.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_urls: Vec<String>,
}

impl Seed {
    /// Parse and check a seed; `origin` names where it came from in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SeedError> {
        let seed: Seed = toml::from_str(text)
            .map_err(|e| SeedError::Parse { origin: origin.to_string(), source: Box::new(e) })?;
        let invalid = |key, problem: &str| SeedError::Invalid {
            origin: origin.to_string(),
            key,
            problem: problem.to_string(),
        };
        crate::https::Endpoint::from_url(&seed.fleet.url, &seed.fleet.name)
            .map_err(|_| invalid("fleet.url", "not https://HOST[:PORT]"))?;
        for url in &seed.fleet.fallback_urls {
            crate::https::Endpoint::from_url(url, &seed.fleet.name).map_err(|_| {
                invalid("fleet.fallback_urls", "an entry is not https://HOST[:PORT]")
            })?;
        }
        crate::tls::server_name(&seed.fleet.name)
            .map_err(|_| invalid("fleet.name", "not a DNS name"))?;
        crate::tls::PinnedCaVerifier::new(&seed.fleet.ca_sha256)
            .map_err(|_| invalid("fleet.ca_sha256", "not 64 hex digits"))?;
        if seed.fleet.token.trim().is_empty() {
            return Err(invalid("fleet.token", "empty"));
        }
        Ok(seed)
    }

    /// The seed as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The fleet endpoint it names.
    pub fn endpoint(&self) -> Result<crate::https::Endpoint, crate::https::ClientError> {
        crate::https::Endpoint::from_url(&self.fleet.url, &self.fleet.name)?
            .with_proxy(self.fleet.https_proxy.as_deref())
    }

    /// Every gateway endpoint in the order to try them: `url`, then `fallback_urls`.
    pub fn endpoints(&self) -> Result<Vec<crate::https::Endpoint>, crate::https::ClientError> {
        std::iter::once(&self.fleet.url)
            .chain(&self.fleet.fallback_urls)
            .map(|url| {
                crate::https::Endpoint::from_url(url, &self.fleet.name)?
                    .with_proxy(self.fleet.https_proxy.as_deref())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(pin: &str) -> String {
        format!(
            "[fleet]\nurl = \"https://10.0.2.2:7443\"\nname = \"hearth-fleet\"\nca_sha256 = \"{pin}\"\ntoken = \"t\"\n"
        )
    }

    #[test]
    fn a_seed_round_trips_and_bad_ones_name_the_key() -> Result<(), SeedError> {
        let seed = Seed::parse(&text(&"ab".repeat(32)), "test")?;
        assert_eq!(Seed::parse(&seed.to_toml(), "again")?, seed);
        let e = Seed::parse(&text("nope"), "cmdline").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("seed from cmdline: fleet.ca_sha256: not 64 hex digits"));
        let extra = format!("{}surprise = 1\n", text(&"ab".repeat(32)));
        let e = Seed::parse(&extra, "x").err().map(|e| format!("{:?}", e));
        assert!(e.is_some_and(|e| e.contains("surprise")));
        Ok(())
    }

    #[test]
    fn fallback_gateways_come_after_the_url_in_order() -> Result<(), Box<dyn std::error::Error>> {
        // Fallback gateways: tried after `url`, in order; each is checked.
        let two = text(&"ab".repeat(32)).replace(
            "token = \"t\"\n",
            "token = \"t\"\nfallback_urls = [\"https://10.0.2.3:7443\", \"https://[fd00::1]:8443\"]\n",
        );
        let seed = Seed::parse(&two, "two")?;
        assert_eq!(Seed::parse(&seed.to_toml(), "again")?, seed);
        let addrs: Vec<String> = seed.endpoints()?.iter().map(|e| e.addr()).collect();
        assert_eq!(addrs, ["10.0.2.2:7443", "10.0.2.3:7443", "[fd00::1]:8443"]);
        let bad = two.replace("https://10.0.2.3:7443", "ftp://x");
        let e = Seed::parse(&bad, "bad").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("seed from bad: fleet.fallback_urls: an entry is not https://HOST[:PORT]")
        );
        Ok(())
    }
}
