//! The pipeline's stages, one module each. A stage is a [`crate::broker::Stage`]: a step
//! function over one queue's typed messages that the shared runtime drives.

pub mod credentials;
pub mod notifier;
pub mod provisioner;
pub mod relay;
pub mod scheduler;
