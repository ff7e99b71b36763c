//! hcblk wire protocol.
