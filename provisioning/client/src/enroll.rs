//! Enrollment and renewal calls (node side).

use hearth_proto::fleet::{EnrollRequest, EnrollResponse, RenewRequest};

use crate::https::{ClientError, Endpoint, json};
use crate::tls::{ClientIdentity, client_config, pin_of_pem};

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The request failed or was refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The fleet's CA in the answer is not the pinned one.
    #[error("fleet answered with a CA whose SHA-256 {got} is not the pinned {pinned}")]
    CaMismatch {
        /// Pinned.
        pinned: String,
        /// Received.
        got: String,
    },
}

fn check_ca(pin: &str, resp: &EnrollResponse) -> Result<(), EnrollError> {
    let got = pin_of_pem(&resp.ca_pem).map_err(ClientError::from)?;
    if !got.eq_ignore_ascii_case(pin.trim()) {
        return Err(EnrollError::CaMismatch { pinned: pin.to_string(), got });
    }
    Ok(())
}

/// `POST /v1/enroll` (server-authenticated HTTPS, no client certificate).
pub async fn enroll(
    ep: &Endpoint,
    pin: &str,
    req: &EnrollRequest,
) -> Result<EnrollResponse, EnrollError> {
    let config = client_config(pin, None, b"http/1.1").map_err(ClientError::from)?;
    let resp: EnrollResponse = json(ep, config, "POST", "/v1/enroll", Some(req)).await?;
    check_ca(pin, &resp)?;
    Ok(resp)
}

/// `POST /v1/renew` with the current certificate: a new one for the CSR.
pub async fn renew(
    ep: &Endpoint,
    pin: &str,
    current: &ClientIdentity,
    csr_pem: &str,
) -> Result<EnrollResponse, EnrollError> {
    let config = client_config(pin, Some(current), b"http/1.1").map_err(ClientError::from)?;
    let req = RenewRequest { csr_pem: csr_pem.to_string() };
    let resp: EnrollResponse = json(ep, config, "POST", "/v1/renew", Some(&req)).await?;
    check_ca(pin, &resp)?;
    Ok(resp)
}
