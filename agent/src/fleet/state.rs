//! The enrollment state machine: a pure value changed in memory and saved by one atomic write
//! ([`crate::persist::Store`], `state.dir/fleet.json`, generation-numbered).
//!
//! `Unenrolled` → (enrolled) → `Enrolled` → (renewed at half-life) → `Enrolled` …;
//! `Enrolled` → (the fleet says revoked) → `Revoked`, final: the node stops its session and says so
//! until an operator wipes the state.

use serde::{Deserialize, Serialize};

/// What the node knows of its membership.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Membership {
    /// Not enrolled yet.
    #[default]
    Unenrolled,
    /// Enrolled: holds a certificate.
    Enrolled(Enrolled),
    /// The fleet revoked this node.
    Revoked {
        /// The node id.
        node_id: String,
        /// What the fleet said.
        reason: String,
    },
}

/// An enrolled node's certificate and fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// Node id.
    pub node_id: String,
    /// Certificate (PEM).
    pub cert_pem: String,
    /// The fleet CA (PEM).
    pub ca_pem: String,
    /// Validity start, ms.
    pub not_before_ms: u64,
    /// Expiry, ms.
    pub not_after_ms: u64,
}

impl Enrolled {
    /// When to renew: half-way through the validity.
    pub fn renew_at_ms(&self) -> u64 {
        self.not_before_ms + (self.not_after_ms.saturating_sub(self.not_before_ms)) / 2
    }
}

impl Membership {
    /// After a successful enrollment or renewal.
    pub fn certified(resp: hearth_proto::fleet::EnrollResponse) -> Self {
        Membership::Enrolled(Enrolled {
            node_id: resp.node_id,
            cert_pem: resp.cert_pem,
            ca_pem: resp.ca_pem,
            not_before_ms: resp.not_before_ms,
            not_after_ms: resp.not_after_ms,
        })
    }

    /// The fleet said this node is revoked.
    pub fn revoked(&self, reason: &str) -> Self {
        match self {
            Membership::Enrolled(e) => {
                Membership::Revoked { node_id: e.node_id.clone(), reason: reason.to_string() }
            }
            other => other.clone(),
        }
    }
}

/// Full-jitter exponential backoff: a uniform draw in `[0, min(cap, base · 2^attempt)]`.
pub fn backoff_ms(attempt: u32, base_ms: u64, cap_ms: u64, unit: f64) -> u64 {
    let ceiling = base_ms.saturating_mul(1u64 << attempt.min(30)).min(cap_ms);
    (ceiling as f64 * unit.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Store;

    fn resp() -> hearth_proto::fleet::EnrollResponse {
        hearth_proto::fleet::EnrollResponse {
            node_id: "n-1".into(),
            cert_pem: "c".into(),
            ca_pem: "ca".into(),
            not_before_ms: 1000,
            not_after_ms: 9000,
        }
    }

    #[test]
    fn transitions_persist_with_rising_generations() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::new(dir.path().join("fleet.json"));
        let m = Membership::certified(resp());
        let Membership::Enrolled(e) = &m else { return Err("not enrolled".into()) };
        assert_eq!(e.renew_at_ms(), 5000);
        store.save(1, &m)?;
        let revoked = m.revoked("node n-1 is revoked");
        assert_eq!(
            revoked,
            Membership::Revoked { node_id: "n-1".into(), reason: "node n-1 is revoked".into() }
        );
        store.save(2, &revoked)?;
        let loaded = store.load::<Membership>()?.ok_or("missing")?;
        assert_eq!((loaded.generation, loaded.state), (2, revoked.clone()));
        // Revoked is final.
        assert_eq!(revoked.revoked("again"), revoked);
        Ok(())
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        assert_eq!(backoff_ms(0, 1000, 300_000, 1.0), 1000);
        assert_eq!(backoff_ms(3, 1000, 300_000, 1.0), 8000);
        assert_eq!(backoff_ms(3, 1000, 300_000, 0.5), 4000);
        assert_eq!(backoff_ms(3, 1000, 300_000, 0.0), 0);
        assert_eq!(backoff_ms(40, 1000, 300_000, 1.0), 300_000);
    }
}
