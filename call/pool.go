package call

import (
	"math/bits"
	"sync"
	"unsafe"
)

// Buffer pools in size classes. A pooled buffer up to maxClassBuffer is a fixed-size array, so
// that giving it back costs no allocation: its pointer is recovered from the slice's capacity.
// Larger buffers are pooled by power-of-two capacity up to maxPooledBuffer.
const (
	smallBuffer     = 512
	mediumBuffer    = 4 << 10
	largeBuffer     = 64 << 10
	chunkBuffer     = largeBuffer // the pieces a large inbound message is collected in
	hugeBuffer      = 256 << 10
	maxClassShift   = 20
	maxPooledShift  = 26
	maxClassBuffer  = 1 << maxClassShift
	maxPooledBuffer = 1 << maxPooledShift
)

var (
	smallPool  sync.Pool // *[smallBuffer]byte
	mediumPool sync.Pool // *[mediumBuffer]byte
	largePool  sync.Pool // *[largeBuffer]byte
	hugePool   sync.Pool // *[hugeBuffer]byte
	classPool  sync.Pool // *[maxClassBuffer]byte
	// bigPools[i] holds *[]byte of capacity maxClassBuffer<<(i+1).
	bigPools [maxPooledShift - maxClassShift]sync.Pool
)

// getBuffer returns a buffer of length n, pooled when n fits a size class. Its bytes are not
// zeroed: the caller overwrites all n of them.
func getBuffer(n int) []byte {
	switch {
	case n <= smallBuffer:
		if p, ok := smallPool.Get().(*[smallBuffer]byte); ok {
			return p[:n]
		}
		return new([smallBuffer]byte)[:n]
	case n <= mediumBuffer:
		if p, ok := mediumPool.Get().(*[mediumBuffer]byte); ok {
			return p[:n]
		}
		return new([mediumBuffer]byte)[:n]
	case n <= largeBuffer:
		if p, ok := largePool.Get().(*[largeBuffer]byte); ok {
			return p[:n]
		}
		return new([largeBuffer]byte)[:n]
	case n <= hugeBuffer:
		if p, ok := hugePool.Get().(*[hugeBuffer]byte); ok {
			return p[:n]
		}
		return new([hugeBuffer]byte)[:n]
	case n <= maxClassBuffer:
		if p, ok := classPool.Get().(*[maxClassBuffer]byte); ok {
			return p[:n]
		}
		return new([maxClassBuffer]byte)[:n]
	case n <= maxPooledBuffer:
		i := bigClass(n)
		if p, ok := bigPools[i].Get().(*[]byte); ok {
			return (*p)[:n]
		}
		return make([]byte, n, maxClassBuffer<<(i+1))
	default:
		return make([]byte, n)
	}
}

// bigClass returns the index in bigPools of the class that holds n bytes, for
// maxClassBuffer < n <= maxPooledBuffer.
func bigClass(n int) int {
	return bits.Len(uint(n-1)) - maxClassShift - 1
}

// putBuffer returns a buffer from getBuffer to its pool. Other buffers are left to the
// garbage collector.
func putBuffer(b []byte) {
	switch c := cap(b); c {
	case smallBuffer:
		smallPool.Put((*[smallBuffer]byte)(b[:smallBuffer]))
	case mediumBuffer:
		mediumPool.Put((*[mediumBuffer]byte)(b[:mediumBuffer]))
	case largeBuffer:
		largePool.Put((*[largeBuffer]byte)(b[:largeBuffer]))
	case hugeBuffer:
		hugePool.Put((*[hugeBuffer]byte)(b[:hugeBuffer]))
	case maxClassBuffer:
		classPool.Put((*[maxClassBuffer]byte)(b[:maxClassBuffer]))
	default:
		if c > maxClassBuffer && c <= maxPooledBuffer && c&(c-1) == 0 {
			// A variable of its own: taking b's address would move b to the heap on every call.
			whole := b[:c]
			bigPools[bigClass(c)].Put(&whole)
		}
	}
}

// growScratch returns a reader's scratch buffer with room for n bytes.
func growScratch(b []byte, n int) []byte {
	if cap(b) >= n {
		return b
	}
	putScratch(b)
	return getBuffer(n)
}

// putScratch returns a reader's scratch buffer to the pool.
func putScratch(b []byte) {
	if b != nil {
		putBuffer(b)
	}
}

// freeList is a small per-connection free list. Objects that hold channels are recycled per
// connection rather than in a global sync.Pool: a connection's goroutines and channels all
// belong to one testing/synctest bubble, and a channel must not cross bubbles.
type freeList[T any] struct {
	alloc func() *T

	mu sync.Mutex
	// guarded by mu
	items []*T
}

const maxFree = 64

func (f *freeList[T]) get() *T {
	f.mu.Lock()
	if n := len(f.items); n > 0 {
		x := f.items[n-1]
		f.items[n-1] = nil
		f.items = f.items[:n-1]
		f.mu.Unlock()
		return x
	}
	f.mu.Unlock()
	return f.alloc()
}

func (f *freeList[T]) put(x *T) {
	f.mu.Lock()
	if len(f.items) < maxFree {
		f.items = append(f.items, x)
	}
	f.mu.Unlock()
}

// overlaps reports whether the memory of a and b overlaps (up to their capacities).
func overlaps(a, b []byte) bool {
	if cap(a) == 0 || cap(b) == 0 {
		return false
	}
	pa, pb := uintptr(unsafe.Pointer(unsafe.SliceData(a))), uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return pa < pb+uintptr(cap(b)) && pb < pa+uintptr(cap(a))
}
