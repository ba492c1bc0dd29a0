//! Exposures (`hearthctl expose`): which gateway port forwards to which port on which node
//! ([`crate::expose`], `docs/0006-tunnel.md`). One row per gateway port; a node port is exposed
//! at most once, so creating it again returns the existing row.

use super::{Refusal, Registry, RegistryError, Tx, add_event, col, i, int, s, text};

/// One exposure as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// The gateway's listening port.
    pub gateway_port: u16,
    /// The node.
    pub node_id: String,
    /// The port on the node.
    pub node_port: u16,
    /// The operator who created it.
    pub created_by: String,
    /// When, ms since the Unix epoch.
    pub created_ms: u64,
}

const COLUMNS: &str = "gateway_port, node_id, node_port, created_by, created_ms";

fn from_row(r: &[super::Value]) -> Exposure {
    Exposure {
        gateway_port: u16::try_from(i(col(r, 0))).unwrap_or(0),
        node_id: s(col(r, 1)),
        node_port: u16::try_from(i(col(r, 2))).unwrap_or(0),
        created_by: s(col(r, 3)),
        created_ms: i(col(r, 4)) as u64,
    }
}

fn existing(
    tx: &mut dyn Tx,
    node: &str,
    node_port: u16,
) -> Result<Option<Exposure>, RegistryError> {
    let rows = tx.query(
        &format!("SELECT {COLUMNS} FROM exposures WHERE node_id = $1 AND node_port = $2"),
        &[text(node), int(node_port)],
    )?;
    Ok(rows.first().map(|r| from_row(r)))
}

impl Registry {
    /// The exposure of `node_port` on `node`, if there is one.
    pub fn exposure_of(
        &self,
        node: &str,
        node_port: u16,
    ) -> Result<Option<Exposure>, RegistryError> {
        self.rtx(|tx| existing(tx, node, node_port))
    }

    /// Store a new exposure on `e.gateway_port` (which the caller holds bound) and record an
    /// `expose-created` event. An unknown or revoked node is refused; if the node port is
    /// already exposed (another request won a race), that exposure is returned instead and
    /// nothing is written.
    pub fn add_exposure(&self, e: &Exposure) -> Result<Exposure, RegistryError> {
        self.tx(|tx| {
            if tx
                .query("SELECT id FROM nodes WHERE id = $1 AND revoked = 0", &[text(&e.node_id)])?
                .is_empty()
            {
                return Err(Refusal::UnknownNode { node: e.node_id.clone() }.into());
            }
            if let Some(old) = existing(tx, &e.node_id, e.node_port)? {
                return Ok(old);
            }
            tx.exec(
                &format!("INSERT INTO exposures ({COLUMNS}) VALUES ($1, $2, $3, $4, $5)"),
                &[
                    int(e.gateway_port),
                    text(&e.node_id),
                    int(e.node_port),
                    text(&e.created_by),
                    int(e.created_ms),
                ],
            )?;
            let msg = format!(
                "operator {}: gateway port {} → port {} on the node",
                e.created_by, e.gateway_port, e.node_port
            );
            add_event(tx, e.created_ms, Some(&e.node_id), "expose-created", &msg)?;
            Ok(e.clone())
        })
    }

    /// Every exposure, by gateway port.
    pub fn exposures(&self) -> Result<Vec<Exposure>, RegistryError> {
        self.rtx(|tx| {
            let rows =
                tx.query(&format!("SELECT {COLUMNS} FROM exposures ORDER BY gateway_port"), &[])?;
            Ok(rows.iter().map(|r| from_row(r)).collect())
        })
    }

    /// Remove the exposure on `gateway_port` and record `expose-removed`; the removed row, or
    /// `None` if there was none (nothing written).
    pub fn remove_exposure(
        &self,
        gateway_port: u16,
        operator: &str,
        now_ms: u64,
    ) -> Result<Option<Exposure>, RegistryError> {
        self.tx(|tx| {
            let rows = tx.query(
                &format!("SELECT {COLUMNS} FROM exposures WHERE gateway_port = $1"),
                &[int(gateway_port)],
            )?;
            let Some(e) = rows.first().map(|r| from_row(r)) else {
                return Ok(None);
            };
            tx.exec("DELETE FROM exposures WHERE gateway_port = $1", &[int(gateway_port)])?;
            let msg = format!(
                "operator {operator}: gateway port {} → port {} on the node removed",
                e.gateway_port, e.node_port
            );
            add_event(tx, now_ms, Some(&e.node_id), "expose-removed", &msg)?;
            Ok(Some(e))
        })
    }
}
