//! Bulk lanes of a node's tunnel (`docs/0006-tunnel.md`, "Lanes").
//!
//! A node's tunnel is one TLS connection, and every byte on it leaves in order: a 64-byte round
//! trip on one stream waits behind whatever a bulk stream has in flight ahead of it (its window,
//! in the sender's buffers and the kernel's queues). Lanes are extra TLS connections from the
//! node to the same gateway, with the same certificate, that carry the gateway's `Port` streams
//! (workload ingress, forwards), so a bulk transfer has a connection of its own and the tunnel's
//! primary connection keeps its control messages, pings, shells, commands and API calls.
//!
//! The gateway asks: on the primary tunnel it sends [`LaneMsg::Offer`] (a control message, stream
//! 0) with a count and a random token. The node opens up to that many connections with ALPN
//! [`LANE_ALPN`] and sends [`LaneMsg::Join`] with the token as the first control message on each.
//! The gateway attaches a lane to the primary tunnel whose token it presents, and closes the lanes
//! with that tunnel. A node that does not know lanes ignores the offer; a gateway that does not
//! know them never sends one.
//!
//! Messages are postcard-encoded; [`LaneMsg::decode`] checks every field.

use serde::{Deserialize, Serialize};

/// The ALPN id of a lane connection (the fleet's TLS port, a node certificate).
pub const LANE_ALPN: &[u8] = b"hearth-lane/1";

/// Most lanes one tunnel may have.
pub const MAX_LANES: u8 = 8;

/// Bytes of a lane token.
pub const TOKEN_LEN: usize = 16;

/// A control message about lanes (tunnel stream 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaneMsg {
    /// Gateway → node, on the primary tunnel: open up to `count` lanes presenting `token`.
    Offer {
        /// Lanes wanted (1..=[`MAX_LANES`]).
        count: u8,
        /// What each lane presents in its [`LaneMsg::Join`].
        token: [u8; TOKEN_LEN],
    },
    /// Node → gateway, the first control message on a lane connection.
    Join {
        /// The token of the offer this lane answers.
        token: [u8; TOKEN_LEN],
    },
}

/// A control message that is not a valid [`LaneMsg`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneError {
    /// Not a lane message (another message type, or bytes that do not decode).
    #[error("not a lane message ({len} bytes): {reason}")]
    Malformed {
        /// Bytes received.
        len: usize,
        /// What the decoder said.
        reason: String,
    },
    /// Bytes left after the message.
    #[error("{extra} bytes after the lane message")]
    Trailing {
        /// Bytes left over.
        extra: usize,
    },
    /// An offer of no lanes or of more than [`MAX_LANES`].
    #[error("an offer of {count} lanes (1..={MAX_LANES} allowed)")]
    Count {
        /// The count offered.
        count: u8,
    },
}

impl LaneMsg {
    /// The message's bytes (a control message's payload).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a fixed-size enum into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Read a control message's payload; every field is checked.
    pub fn decode(payload: &[u8]) -> Result<Self, LaneError> {
        let (msg, rest) = postcard::take_from_bytes::<LaneMsg>(payload)
            .map_err(|e| LaneError::Malformed { len: payload.len(), reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(LaneError::Trailing { extra: rest.len() });
        }
        if let LaneMsg::Offer { count, .. } = msg
            && (count == 0 || count > MAX_LANES)
        {
            return Err(LaneError::Count { count });
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn messages_round_trip() -> TestResult {
        for m in [
            LaneMsg::Offer { count: 1, token: [7; TOKEN_LEN] },
            LaneMsg::Offer { count: MAX_LANES, token: [0xff; TOKEN_LEN] },
            LaneMsg::Join { token: [1; TOKEN_LEN] },
        ] {
            assert_eq!(LaneMsg::decode(&m.encode())?, m);
        }
        Ok(())
    }

    #[test]
    fn wire_format_is_fixed() {
        // The variant index, then the fields: a count byte and the token's 16 bytes.
        let mut offer = vec![0, 2];
        offer.extend_from_slice(&[9; TOKEN_LEN]);
        assert_eq!(LaneMsg::Offer { count: 2, token: [9; TOKEN_LEN] }.encode(), offer);
        let mut join = vec![1];
        join.extend_from_slice(&[3; TOKEN_LEN]);
        assert_eq!(LaneMsg::Join { token: [3; TOKEN_LEN] }.encode(), join);
    }

    #[test]
    fn bad_messages_are_named() {
        let offer = |count| LaneMsg::Offer { count, token: [0; TOKEN_LEN] }.encode();
        assert_eq!(LaneMsg::decode(&offer(0)), Err(LaneError::Count { count: 0 }));
        assert_eq!(
            LaneMsg::decode(&offer(MAX_LANES + 1)),
            Err(LaneError::Count { count: MAX_LANES + 1 })
        );
        let mut long = LaneMsg::Join { token: [2; TOKEN_LEN] }.encode();
        long.extend_from_slice(b"xy");
        assert_eq!(LaneMsg::decode(&long), Err(LaneError::Trailing { extra: 2 }));
        let short = &LaneMsg::Join { token: [2; TOKEN_LEN] }.encode()[..5];
        assert!(matches!(LaneMsg::decode(short), Err(LaneError::Malformed { len: 5, .. })));
        assert!(matches!(LaneMsg::decode(&[9]), Err(LaneError::Malformed { len: 1, .. })));
        assert!(matches!(LaneMsg::decode(&[]), Err(LaneError::Malformed { len: 0, .. })));
    }
}
