//! placeholder: the claude protocol (being written).
