"""Studies: experiments that train and measure several models through the library, each a command line."""
