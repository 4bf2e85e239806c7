//! Integration tests of bundle-agent.
