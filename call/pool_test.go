package call

import "testing"

func TestOverlaps(t *testing.T) {
	a := make([]byte, 100)
	b := make([]byte, 100)
	for _, tc := range []struct {
		name string
		x, y []byte
		want bool
	}{
		{"same", a, a, true},
		{"head and tail", a[:10], a[90:], true}, // a[:10] reaches to cap(a)
		{"tail inside", a, a[50:60], true},
		{"disjoint arrays", a, b, false},
		{"capped head and tail", a[:10:10], a[10:], false},
		{"empty capacity", a[100:], a, false},
		{"nil", nil, a, false},
	} {
		if got := overlaps(tc.x, tc.y); got != tc.want {
			t.Errorf("%s: overlaps = %v, want %v", tc.name, got, tc.want)
		}
		if got := overlaps(tc.y, tc.x); got != tc.want {
			t.Errorf("%s, swapped: overlaps = %v, want %v", tc.name, got, tc.want)
		}
	}
}
