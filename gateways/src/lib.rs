//! The edges: axum HTTP + async-graphql API, auth, audit endpoints, `/metrics`, provider
//! connectors and webhook delivery. Not built yet: issues 5 and 7.
