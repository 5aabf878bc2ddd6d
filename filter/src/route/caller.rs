//! Who calls, as the route sees them: the API key whose quotas they draw from, and what they
//! may use (`request::authenticate` tells who they are).

use crate::auth::ApiKey;
use crate::endpoint::ServiceType;
use crate::plan::Plan;
use crate::reply::LocalReply;

/// Who calls, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Neither API keys nor tokens are configured.
    Anyone,
    /// A configured API key, by index.
    Key(usize),
    /// A JWT Envoy's jwt_authn verified, with what its claims grant.
    Token(ApiKey),
}

impl Caller {
    /// The configured API key, by index: its quotas.
    pub fn key_index(&self) -> Option<usize> {
        match self {
            Caller::Key(at) => Some(*at),
            _ => None,
        }
    }

    /// What the caller may use (`None`: anything).
    pub fn grants<'a>(&'a self, cfg: &'a Plan) -> Option<&'a ApiKey> {
        match self {
            Caller::Anyone => None,
            Caller::Key(at) => cfg.api_keys.keys().get(*at),
            Caller::Token(grants) => Some(grants),
        }
    }

    /// Refuses a request the caller may not make (403), for the service or one of its models.
    pub fn permits(
        &self,
        cfg: &Plan,
        kind: ServiceType,
        model: Option<&str>,
    ) -> Result<(), LocalReply> {
        let Some(key) = self.grants(cfg) else {
            return Ok(());
        };
        key.permits(kind, model).map_err(|e| {
            let mut reply = e.reply().because(e.code());
            reply.service = Some(kind);
            reply
        })
    }
}
