//! Why talking to Redis failed, sorted by what the caller should do about it.

use redis::RedisError;

/// Why talking to Redis failed, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection broke or the server is not serving (loading, failing over): back off,
    /// reconnect, try again.
    #[error("Redis is unreachable: {0}")]
    Unavailable(RedisError),
    /// The group (or its stream) does not exist, e.g. after a restart of a Redis without
    /// persistence.
    #[error("the consumer group does not exist (NOGROUP): {0}")]
    NoGroup(RedisError),
    /// Anything else: a bug, a wrong key type, a permission missing from the ACL user.
    #[error("Redis refused a command: {0}")]
    Command(RedisError),
    #[error("unexpected reply from Redis to {command}: {detail}")]
    Protocol {
        command: &'static str,
        detail: String,
    },
}

impl From<RedisError> for ClientError {
    fn from(e: RedisError) -> Self {
        if e.code() == Some("NOGROUP") {
            Self::NoGroup(e)
        } else if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.code(),
                Some(
                    "LOADING"
                        | "BUSY"
                        | "MASTERDOWN"
                        | "TRYAGAIN"
                        | "CLUSTERDOWN"
                        | "READONLY"
                        | "MOVED"
                        | "ASK"
                )
            )
        {
            Self::Unavailable(e)
        } else {
            Self::Command(e)
        }
    }
}

impl ClientError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
    /// A short label for `streamworker_redis_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::NoGroup(_) => "nogroup",
            Self::Command(_) => "command",
            Self::Protocol { .. } => "protocol",
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A reply that does not have the shape the command promises: a bug on one side.
pub(super) fn protocol(command: &'static str, detail: impl Into<String>) -> ClientError {
    ClientError::Protocol {
        command,
        detail: detail.into(),
    }
}
