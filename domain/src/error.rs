//! The one error of the domain boundary: a rejected command, by aggregate.

use crate::connection::ConnectionError;
use crate::installation::InstallationError;
use crate::integration::IntegrationError;
use crate::operation::OperationError;
use crate::project::ProjectError;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error(transparent)]
    Project(#[from] ProjectError),
    #[error(transparent)]
    Integration(#[from] IntegrationError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(transparent)]
    Installation(#[from] InstallationError),
    #[error(transparent)]
    Operation(#[from] OperationError),
}

impl DomainError {
    /// A stable, machine-readable code (`installation.paused`, ...), for APIs and logs.
    pub fn code(&self) -> String {
        fn snake(debug: String) -> String {
            let name = debug.split(['(', ' ', '{']).next().unwrap_or_default();
            let mut out = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() {
                    if i > 0 {
                        out.push('_');
                    }
                    out.push(c.to_ascii_lowercase());
                } else {
                    out.push(c);
                }
            }
            out
        }
        let (aggregate, variant) = match self {
            DomainError::Project(e) => ("project", format!("{e:?}")),
            DomainError::Integration(e) => ("integration", format!("{e:?}")),
            DomainError::Connection(e) => ("connection", format!("{e:?}")),
            DomainError::Installation(e) => ("installation", format!("{e:?}")),
            DomainError::Operation(e) => ("operation", format!("{e:?}")),
        };
        format!("{aggregate}.{}", snake(variant))
    }
}
