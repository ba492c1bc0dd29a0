//! The `hearth/1` control session: frame I/O (shared with the fleet) and the node-side
//! [`Session`]: [`ControlMessage`]s as Control frames on one outbound mTLS connection of its own
//! (ALPN `hearth/1`, [`Session::open`]), or the same frames in a [`Target::Session`] stream of
//! the node's tunnel ([`Session::on_tunnel`], ALPN
//! [`hearth_proto::mux::TUNNEL_SESSION_ALPN`]), so both ends run the same session code on
//! either, and on the tunnel the session has a stream's flow control.

use std::sync::Arc;
use std::time::Duration;

use hearth_proto::control::{self, ControlMessage, Hello, Welcome};
use hearth_proto::frame::{self, FrameType, HEADER_LEN, Header};
use hearth_proto::mux::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::https::{ClientError, Endpoint, connect_tls};
use crate::tls::{ClientIdentity, client_config};
use crate::tunnel::TunnelHandle;

/// How long a session opened on a tunnel waits for the fleet's Welcome (the tunnel's pings keep
/// it alive, so silence alone would never end it).
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// The read half of a session's connection.
pub type SessionReader = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a session's connection.
pub type SessionWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// Why the session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] ClientError),
    /// Reading or writing failed (or the peer closed).
    #[error("session I/O failed")]
    Io(#[from] std::io::Error),
    /// A frame was invalid.
    #[error("bad frame from peer")]
    Frame(#[from] frame::FrameError),
    /// A frame of a type this side does not handle here.
    #[error("unexpected frame type {0:?} on the control session")]
    UnexpectedFrame(FrameType),
    /// A control message was invalid.
    #[error("bad control message from peer")]
    Control(#[from] control::ControlError),
    /// Encoding failed.
    #[error("cannot encode a control message")]
    Encode(#[from] control::FrameEncodeError),
    /// The fleet refused the session.
    #[error("fleet refused the session: {reason}")]
    Refused {
        /// Why.
        reason: String,
        /// The node's certificate is revoked.
        revoked: bool,
    },
    /// The peer sent something else than the protocol expects.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Nothing came from the fleet for `silent_s` seconds while another connection to the same
    /// gateway got through: this connection waits out TCP's retransmission backoff (tens of
    /// seconds after a long outage), so a new one should replace it now.
    #[error(
        "nothing from the fleet for {silent_s} s on this connection while the path works again"
    )]
    Stalled {
        /// Seconds since the last message from the fleet.
        silent_s: u64,
    },
}

/// Read one control message (header first, so an oversized frame is refused before its payload).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<ControlMessage, SessionError> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head).await?;
    let header = Header::parse(&head)?;
    if header.kind != FrameType::Control {
        return Err(SessionError::UnexpectedFrame(header.kind));
    }
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload).await?;
    Ok(ControlMessage::decode(&payload)?)
}

/// Write one control message as a frame, and flush.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ControlMessage,
) -> Result<(), SessionError> {
    let bytes = msg.to_frame()?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// A node's open control session.
pub struct Session {
    /// Messages from the fleet.
    pub reader: SessionReader,
    /// Messages to the fleet.
    pub writer: SessionWriter,
    /// The fleet's welcome.
    pub welcome: Welcome,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("welcome", &self.welcome).finish_non_exhaustive()
    }
}

impl Session {
    /// Connect with the node's certificate, say Hello and wait for Welcome.
    pub async fn open(
        ep: &Endpoint,
        pin: &str,
        identity: &ClientIdentity,
        agent_version: &str,
    ) -> Result<Self, SessionError> {
        let config =
            client_config(pin, Some(identity), control::ALPN).map_err(ClientError::from)?;
        Self::open_with(ep, config, agent_version, control::PROTOCOL_VERSION).await
    }

    /// Connect with a prepared client config (reuse it across many sessions) speaking protocol
    /// version `version`.
    pub async fn open_with(
        ep: &Endpoint,
        config: Arc<rustls::ClientConfig>,
        agent_version: &str,
        version: u16,
    ) -> Result<Self, SessionError> {
        let tls = connect_tls(ep, config).await?;
        Self::hello(tls, agent_version, version).await
    }

    /// Open the session on a node's tunnel that carries it (connected with
    /// [`crate::tunnel::connect_node`], the gateway took
    /// [`hearth_proto::mux::TUNNEL_SESSION_ALPN`]): a [`Target::Session`] stream, Hello, and the
    /// Welcome within [`WELCOME_TIMEOUT`]. The session ends when the tunnel does.
    pub async fn on_tunnel(
        tunnel: &TunnelHandle,
        agent_version: &str,
    ) -> Result<Self, SessionError> {
        let stream = tunnel.open(&Target::Session)?;
        tokio::time::timeout(
            WELCOME_TIMEOUT,
            Self::hello(stream, agent_version, control::PROTOCOL_VERSION),
        )
        .await
        .map_err(|_| {
            SessionError::Protocol(format!(
                "no Welcome on the tunnel within {} s",
                WELCOME_TIMEOUT.as_secs()
            ))
        })?
    }

    async fn hello<S>(stream: S, agent_version: &str, version: u16) -> Result<Self, SessionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let mut reader: SessionReader = Box::new(reader);
        let mut writer: SessionWriter = Box::new(writer);
        let hello = ControlMessage::Hello(Hello {
            protocol_version: version,
            agent_version: agent_version.to_string(),
        });
        write_message(&mut writer, &hello).await?;
        match read_message(&mut reader).await? {
            ControlMessage::Welcome(welcome) => Ok(Self { reader, writer, welcome }),
            ControlMessage::Refused(r) => {
                Err(SessionError::Refused { reason: r.reason, revoked: r.revoked })
            }
            other => Err(SessionError::Protocol(format!("expected Welcome, got {other:?}"))),
        }
    }

    /// Send one message.
    pub async fn send(&mut self, msg: &ControlMessage) -> Result<(), SessionError> {
        write_message(&mut self.writer, msg).await
    }

    /// Receive one message.
    pub async fn recv(&mut self) -> Result<ControlMessage, SessionError> {
        read_message(&mut self.reader).await
    }
}
