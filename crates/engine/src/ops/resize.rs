//! Resizing (nearest, bilinear) with correct gradients.
