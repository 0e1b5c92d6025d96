//! The local socket API for the robot software (being written).
