/* Plain-fd I/O with raw.py's semantics: see fileio.h. */
#define _GNU_SOURCE
#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>


int hv_pread_full(int fd, uint8_t *buf, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0) {                   /* past the end: zeros, as raw.py does */
            memset(buf + done, 0, len - done);
            return 0;
        }
        done += (uint64_t)n;
    }
    return 0;
}

int hv_pwrite_full(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        done += (uint64_t)n;
    }
    return 0;
}

/* unaligned O_DIRECT I/O through the aligned bounce buffer (raw.py _bounced) */
static int bounced(const struct hv_file *f, uint8_t *bounce, uint64_t offset, uint8_t *buf,
                   uint64_t total, int write)
{
    uint64_t a = f->align, done = 0;
    while (done < total) {
        uint64_t pos = offset + done;
        uint64_t start = pos - pos % a;
        uint64_t n = total - done;
        if (n > HV_BOUNCE_CHUNK - (pos - start))
            n = HV_BOUNCE_CHUNK - (pos - start);
        uint64_t end = pos + n;
        uint64_t end_al = (end + a - 1) / a * a;
        uint8_t *span = bounce;
        int r;
        if (!write) {
            if ((r = hv_pread_full(f->fd, span, end_al - start, start)))
                return r;
            memcpy(buf + done, span + (pos - start), n);
        } else {
            if (pos != start || end != end_al)
                if ((r = hv_pread_full(f->fd, span, end_al - start, start)))
                    return r;
            memcpy(span + (pos - start), buf + done, n);
            /* at the end of a file whose size is not a multiple of the
             * alignment, O_DIRECT writes a whole block past the end: cut
             * the file back, or the disk grows on the next open */
            uint64_t file_end = end_al;
            if (end_al > f->size) {
                struct stat st;
                if (fstat(f->fd, &st))
                    return -errno;
                file_end = (uint64_t)st.st_size;
            }
            if ((r = hv_pwrite_full(f->fd, span, end_al - start, start)))
                return r;
            if (end_al > file_end && ftruncate(f->fd, (off_t)file_end))
                return -errno;
        }
        done += n;
    }
    return 0;
}

int hv_file_direct_ok(const struct hv_file *f, uint64_t off, const void *buf, uint64_t len)
{
    uint64_t a = f->align;
    return a <= 1 || !(off % a || len % a || (uintptr_t)buf % a);
}

int hv_file_io(const struct hv_file *f, uint8_t *bounce, uint64_t off, uint8_t *buf,
               uint64_t len, int write)
{
    if (off > f->size || len > f->size - off)
        return -EINVAL;
    if (!hv_file_direct_ok(f, off, buf, len))
        return bounced(f, bounce, off, buf, len, write);
    return write ? hv_pwrite_full(f->fd, buf, len, off) : hv_pread_full(f->fd, buf, len, off);
}

int hv_file_flush(const struct hv_file *f)
{
    if (f->read_only)
        return 0;
    return fdatasync(f->fd) ? -errno : 0;
}

int hv_fallocate(const struct hv_file *f, int mode, uint64_t off, uint64_t len)
{
    if (fallocate(f->fd, mode, (off_t)off, (off_t)len) == 0)
        return 1;
    int err = errno;
    if (err == EOPNOTSUPP || err == ENOSYS || err == EINVAL || err == ENODEV)
        return 0;
    return -err;
}

int hv_write_zeroes(const struct hv_file *f, uint8_t *bounce, const uint8_t *zeros,
                    uint64_t off, uint64_t len)
{
    if (len == 0)
        return 0;
    int r = hv_fallocate(f, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len);
    if (r)
        return r < 0 ? r : 0;
    r = hv_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
    if (r)
        return r < 0 ? r : 0;
    /* write zeros from the aligned zero buffer (not the bounce: bounced()
     * fills that) */
    uint64_t done = 0;
    while (done < len) {
        uint64_t n = len - done < HV_BOUNCE_CHUNK ? len - done : HV_BOUNCE_CHUNK;
        if ((r = hv_file_io(f, bounce, off + done, (uint8_t *)zeros, n, 1)))
            return r;
        done += n;
    }
    return 0;
}

int hv_discard(const struct hv_file *f, uint64_t off, uint64_t len)
{
    if (!len)
        return 0;
    int r = hv_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
    return r < 0 ? r : 0;
}

int hv_io_buffers(uint8_t **bounce, uint8_t **zeros)
{
    *bounce = mmap(NULL, HV_BOUNCE_CHUNK + 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* read-only zero pages: address space only, allocated here and not on
     * first use so that engines on several threads never race for it */
    *zeros = mmap(NULL, HV_BOUNCE_CHUNK, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (*bounce == MAP_FAILED)
        *bounce = NULL;
    if (*zeros == MAP_FAILED)
        *zeros = NULL;
    if (!*bounce || !*zeros) {
        hv_io_buffers_free(*bounce, *zeros);
        *bounce = *zeros = NULL;
        return -ENOMEM;
    }
    return 0;
}

void hv_io_buffers_free(uint8_t *bounce, uint8_t *zeros)
{
    if (bounce)
        munmap(bounce, HV_BOUNCE_CHUNK + 4096);
    if (zeros)
        munmap(zeros, HV_BOUNCE_CHUNK);
}
