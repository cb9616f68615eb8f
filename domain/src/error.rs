//! The one error of the domain boundary: a rejected command, by aggregate.

use crate::admin_key::AdminKeyError;
use crate::change::ChangeError;
use crate::connect_session::ConnectSessionError;
use crate::connection::ConnectionError;
use crate::installation::InstallationError;
use crate::integration::IntegrationError;
use crate::operation::OperationError;
use crate::organization::OrganizationError;
use crate::project::ProjectError;
use crate::provider_app::ProviderAppError;

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
    #[error(transparent)]
    ProviderApp(#[from] ProviderAppError),
    #[error(transparent)]
    ConnectSession(#[from] ConnectSessionError),
    #[error(transparent)]
    Organization(#[from] OrganizationError),
    #[error(transparent)]
    AdminKey(#[from] AdminKeyError),
    #[error(transparent)]
    Change(#[from] ChangeError),
}

impl DomainError {
    /// A stable, machine-readable code (`installation.paused`, ...), for APIs and logs.
    pub fn code(&self) -> String {
        let (aggregate, variant) = match self {
            DomainError::Project(e) => ("project", e.code()),
            DomainError::Integration(e) => ("integration", e.code()),
            DomainError::Connection(e) => ("connection", e.code()),
            DomainError::Installation(e) => ("installation", e.code()),
            DomainError::Operation(e) => ("operation", e.code()),
            DomainError::ProviderApp(e) => ("provider_app", e.code()),
            DomainError::ConnectSession(e) => ("connect_session", e.code()),
            DomainError::Organization(e) => ("organization", e.code()),
            DomainError::AdminKey(e) => ("admin_key", e.code()),
            DomainError::Change(e) => ("change", e.code()),
        };
        format!("{aggregate}.{variant}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the API can answer with for a refused command: a change here is a change
    /// of the public API.
    #[test]
    fn every_domain_error_code() {
        let codes: Vec<(String, &str)> = vec![
            (DomainError::from(ProjectError::AlreadyExists).code(), "project.already_exists"),
            (DomainError::from(ProjectError::NotFound).code(), "project.not_found"),
            (DomainError::from(ProjectError::InvalidName).code(), "project.invalid_name"),
            (DomainError::from(ProjectError::KeyRevoked).code(), "project.key_revoked"),
            (DomainError::from(ProjectError::InvalidConfig).code(), "project.invalid_config"),
            (DomainError::from(ProjectError::DestinationDisabled).code(), "project.destination_disabled"),
            (DomainError::from(ProjectError::JwtKeyNotFound).code(), "project.jwt_key_not_found"),
            (DomainError::from(ProjectError::AlreadyInOrganization).code(), "project.already_in_organization"),
            (DomainError::from(ProjectError::InvalidTopics(String::new())).code(), "project.invalid_topics"),
            (DomainError::from(ProjectError::UnknownDestination(String::new())).code(), "project.unknown_destination"),
            (DomainError::from(ProjectError::SubscriptionNotFound).code(), "project.subscription_not_found"),
            (DomainError::from(ProjectError::TooManySubscriptions).code(), "project.too_many_subscriptions"),
            (DomainError::from(OrganizationError::AlreadyExists).code(), "organization.already_exists"),
            (DomainError::from(OrganizationError::NotFound).code(), "organization.not_found"),
            (DomainError::from(OrganizationError::InvalidName).code(), "organization.invalid_name"),
            (DomainError::from(OrganizationError::AlreadyAdded).code(), "organization.already_added"),
            (DomainError::from(AdminKeyError::AlreadyExists).code(), "admin_key.already_exists"),
            (DomainError::from(AdminKeyError::NotFound).code(), "admin_key.not_found"),
            (DomainError::from(AdminKeyError::Revoked).code(), "admin_key.revoked"),
            (DomainError::from(AdminKeyError::InvalidText).code(), "admin_key.invalid_text"),
            (DomainError::from(IntegrationError::AlreadyDeclared).code(), "integration.already_declared"),
            (DomainError::from(IntegrationError::NotFound).code(), "integration.not_found"),
            (DomainError::from(IntegrationError::InvalidName).code(), "integration.invalid_name"),
            (DomainError::from(IntegrationError::InvalidProvider).code(), "integration.invalid_provider"),
            (DomainError::from(IntegrationError::EmptyManifest).code(), "integration.empty_manifest"),
            (
                DomainError::from(IntegrationError::DuplicateObject(String::new())).code(),
                "integration.duplicate_object",
            ),
            (
                DomainError::from(IntegrationError::InvalidObjectName(String::new())).code(),
                "integration.invalid_object_name",
            ),
            (
                DomainError::from(IntegrationError::InvalidSchedule(String::new())).code(),
                "integration.invalid_schedule",
            ),
            (DomainError::from(ConnectionError::AlreadyExists).code(), "connection.already_exists"),
            (DomainError::from(ConnectionError::NotFound).code(), "connection.not_found"),
            (DomainError::from(ConnectionError::Revoked).code(), "connection.revoked"),
            (DomainError::from(ConnectionError::NeedsReconnect).code(), "connection.needs_reconnect"),
            (DomainError::from(ConnectionError::AlreadyBadCredentials).code(), "connection.already_bad_credentials"),
            (DomainError::from(ConnectionError::InvalidGroupRef).code(), "connection.invalid_group_ref"),
            (DomainError::from(ConnectionError::InvalidProvider).code(), "connection.invalid_provider"),
            (DomainError::from(ConnectionError::InvalidCredential).code(), "connection.invalid_credential"),
            (DomainError::from(InstallationError::AlreadyExists).code(), "installation.already_exists"),
            (DomainError::from(InstallationError::NotFound).code(), "installation.not_found"),
            (DomainError::from(InstallationError::Deleted).code(), "installation.deleted"),
            (DomainError::from(InstallationError::Paused).code(), "installation.paused"),
            (DomainError::from(InstallationError::AlreadyPaused).code(), "installation.already_paused"),
            (DomainError::from(InstallationError::NotPaused).code(), "installation.not_paused"),
            (DomainError::from(InstallationError::IntegrationNotFound).code(), "installation.integration_not_found"),
            (DomainError::from(InstallationError::UnknownRevision(0)).code(), "installation.unknown_revision"),
            (DomainError::from(InstallationError::UnknownObject(String::new())).code(), "installation.unknown_object"),
            (
                DomainError::from(InstallationError::ObjectDisabled(String::new())).code(),
                "installation.object_disabled",
            ),
            (
                DomainError::from(InstallationError::InvalidSchedule(String::new())).code(),
                "installation.invalid_schedule",
            ),
            (DomainError::from(InstallationError::ConnectionNotFound).code(), "installation.connection_not_found"),
            (DomainError::from(InstallationError::ConnectionMismatch).code(), "installation.connection_mismatch"),
            (DomainError::from(InstallationError::ConnectionRevoked).code(), "installation.connection_revoked"),
            (DomainError::from(InstallationError::NeedsReauth).code(), "installation.needs_reauth"),
            (DomainError::from(InstallationError::InvalidRef).code(), "installation.invalid_ref"),
            (DomainError::from(InstallationError::NoObjects).code(), "installation.no_objects"),
            (DomainError::from(OperationError::AlreadyExists).code(), "operation.already_exists"),
            (DomainError::from(OperationError::NotFound).code(), "operation.not_found"),
            (DomainError::from(OperationError::LeaseHeld).code(), "operation.lease_held"),
            (DomainError::from(OperationError::NotRunning).code(), "operation.not_running"),
            (DomainError::from(OperationError::StaleLease).code(), "operation.stale_lease"),
            (
                DomainError::from(OperationError::AlreadyFinished(crate::operation::OperationStatus::Failed)).code(),
                "operation.already_finished",
            ),
            (DomainError::from(OperationError::NotFailed).code(), "operation.not_failed"),
            (DomainError::from(OperationError::NotRetryable).code(), "operation.not_retryable"),
            (DomainError::from(OperationError::NotDeadLettered).code(), "operation.not_dead_lettered"),
            (DomainError::from(OperationError::InvalidProxyCall).code(), "operation.invalid_proxy_call"),
            (DomainError::from(OperationError::InvalidWindow).code(), "operation.invalid_window"),
            (DomainError::from(OperationError::MissingObject).code(), "operation.missing_object"),
            (DomainError::from(OperationError::InvalidLease).code(), "operation.invalid_lease"),
            (DomainError::from(OperationError::NoPages).code(), "operation.no_pages"),
            (DomainError::from(OperationError::WrongPage { expected: 0 }).code(), "operation.wrong_page"),
            (DomainError::from(OperationError::DeliveryMismatch).code(), "operation.delivery_mismatch"),
            (DomainError::from(ProviderAppError::AlreadyExists).code(), "provider_app.already_exists"),
            (DomainError::from(ProviderAppError::NotFound).code(), "provider_app.not_found"),
            (DomainError::from(ProviderAppError::InvalidProvider).code(), "provider_app.invalid_provider"),
            (DomainError::from(ProviderAppError::InvalidClientId).code(), "provider_app.invalid_client_id"),
            (DomainError::from(ProviderAppError::InvalidScope(String::new())).code(), "provider_app.invalid_scope"),
            (
                DomainError::from(ProviderAppError::InvalidReturnUrl(String::new())).code(),
                "provider_app.invalid_return_url",
            ),
            (DomainError::from(ProviderAppError::TooMany).code(), "provider_app.too_many"),
            (DomainError::from(ProviderAppError::InvalidCredential).code(), "provider_app.invalid_credential"),
            (DomainError::from(ConnectSessionError::AlreadyExists).code(), "connect_session.already_exists"),
            (DomainError::from(ConnectSessionError::NotFound).code(), "connect_session.not_found"),
            (DomainError::from(ConnectSessionError::Expired).code(), "connect_session.expired"),
            (DomainError::from(ConnectSessionError::AlreadyCompleted).code(), "connect_session.already_completed"),
            (DomainError::from(ConnectSessionError::AlreadyConnected).code(), "connect_session.already_connected"),
            (DomainError::from(ConnectSessionError::StateMismatch).code(), "connect_session.state_mismatch"),
            (DomainError::from(ConnectSessionError::StateUsed).code(), "connect_session.state_used"),
            (DomainError::from(ConnectSessionError::NotAuthorizing).code(), "connect_session.not_authorizing"),
            (DomainError::from(ConnectSessionError::NotConnected).code(), "connect_session.not_connected"),
            (DomainError::from(ConnectSessionError::InvalidRef).code(), "connect_session.invalid_ref"),
            (DomainError::from(ConnectSessionError::InvalidExpiry).code(), "connect_session.invalid_expiry"),
            (DomainError::from(ConnectSessionError::InvalidDigest).code(), "connect_session.invalid_digest"),
            (DomainError::from(ConnectSessionError::InvalidReason).code(), "connect_session.invalid_reason"),
            (DomainError::from(ConnectSessionError::TooManyAttempts).code(), "connect_session.too_many_attempts"),
            (DomainError::from(ChangeError::AlreadyRecorded).code(), "change.already_recorded"),
            (DomainError::from(ChangeError::Invalid).code(), "change.invalid"),
        ];
        for (got, want) in codes {
            assert_eq!(got, want);
        }
    }
}
