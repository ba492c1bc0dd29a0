//! `hearthctl expose NODE PORT`, `expose --list` and `unexpose GATEWAY_PORT`: customer ingress
//! through the fleet's gateway (`POST /v1/nodes/{id}/expose`, `GET /v1/exposures`,
//! `POST /v1/exposures/{port}/remove`). The gateway listens on a port of its `expose_ports`
//! range and forwards each connection over the node's tunnel to the port on the node
//! (`docs/0006-tunnel.md`).

use std::fmt::Write as _;

use hearth_proto::fleet::{ExposeRequest, ExposeView};

use crate::Ctl;

/// The exposure table.
pub fn table(v: &[ExposeView]) -> String {
    let mut t = format!(
        "{:<22} {:<16} {:>9} {:<12} {}\n",
        "GATEWAY ADDRESS", "NODE", "NODE PORT", "BY", "CREATED"
    );
    for e in v {
        let _ = writeln!(
            t,
            "{:<22} {:<16} {:>9} {:<12} {}",
            e.address,
            e.node_id,
            e.node_port,
            e.created_by,
            crate::ago(Some(e.created_ms))
        );
    }
    t
}

pub(crate) async fn expose(ctl: &Ctl, node: &str, port: u16, json: bool) -> anyhow::Result<String> {
    let e: ExposeView =
        ctl.post(&format!("/v1/nodes/{node}/expose"), &ExposeRequest { port }).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&e)?));
    }
    Ok(format!(
        "{} → port {} on node {} (remove: hearthctl unexpose {})\n",
        e.address, e.node_port, e.node_id, e.gateway_port
    ))
}

pub(crate) async fn list(ctl: &Ctl, json: bool) -> anyhow::Result<String> {
    let v: Vec<ExposeView> = ctl.get("/v1/exposures").await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    Ok(table(&v))
}

pub(crate) async fn unexpose(ctl: &Ctl, gateway_port: u16, json: bool) -> anyhow::Result<String> {
    let e: ExposeView = ctl.post(&format!("/v1/exposures/{gateway_port}/remove"), &()).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&e)?));
    }
    Ok(format!("{} no longer forwards to port {} on node {}\n", e.address, e.node_port, e.node_id))
}
