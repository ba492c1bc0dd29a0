//! `hearth-agent`: the node supervisor.
pub mod gpu;
