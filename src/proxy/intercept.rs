//! The hook point every client message passes through on its way upstream.
//!
//! The relay hands each framed client message to [`Interceptor::client_message`], which decides
//! to forward it untouched (zero-copy), replace it, or refuse it. Row policies, field encryption
//! and auditing plug in here; with none of them active the interceptor reports itself as
//! pass-through and the relay skips per-message work beyond bookkeeping.

use bytes::Bytes;

use crate::auth::Identity;
use crate::error::ClientError;
use crate::protocol::Message;

/// What happens to one client message.
#[derive(Debug)]
pub enum Verdict {
    /// Send it upstream as it arrived.
    Forward,
    /// Send these bytes (one or more framed messages) instead.
    Replace(Bytes),
    /// Do not run it; the client gets this error in the message's place in the response stream.
    Refuse(ClientError),
}

/// Per-session interception state.
pub struct Interceptor {
    identity: Identity,
}

impl Interceptor {
    /// The interceptor of one authenticated session.
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }

    /// The session's verified identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// True when no layer needs to see individual messages.
    pub fn is_passthrough(&self) -> bool {
        true
    }

    /// Decide the fate of one client message.
    pub async fn client_message(&mut self, _message: &Message) -> Verdict {
        Verdict::Forward
    }
}
