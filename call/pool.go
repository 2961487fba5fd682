package call

import "sync"

// Buffer pools. A pooled buffer's size class is its capacity; buffers larger than the biggest
// class are left to the garbage collector.
var bufferClasses = [...]int{512, 4 << 10, 64 << 10}

var bufferPools [len(bufferClasses)]sync.Pool

// getBuffer returns a buffer of length n, pooled when n fits a size class.
func getBuffer(n int) []byte {
	for i, c := range bufferClasses {
		if n <= c {
			if p, ok := bufferPools[i].Get().(*[]byte); ok {
				return (*p)[:n]
			}
			return make([]byte, n, c)
		}
	}
	return make([]byte, n)
}

// putBuffer returns a buffer from getBuffer to its pool.
func putBuffer(b []byte) {
	for i, c := range bufferClasses {
		if cap(b) == c {
			b = b[:0]
			bufferPools[i].Put(&b)
			return
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

var outMsgPool = sync.Pool{New: func() any { return newOutMsg() }}

func getOutMsg() *outMsg { return outMsgPool.Get().(*outMsg) }

func putOutMsg(m *outMsg) {
	m.reset()
	m.owned, m.call = false, nil
	outMsgPool.Put(m)
}
