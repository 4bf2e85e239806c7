//! Integration tests of bundle-agent.
mod stage0;
