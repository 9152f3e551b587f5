"""Guest loaders: freestanding ELF, Linux bzImage and PVH, initramfs."""
